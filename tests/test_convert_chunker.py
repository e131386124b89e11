"""Chunking: fixed-size cuts, dedup within and across layers, holes, alignment, codecs."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from pathlib import Path

import pytest

from converter.chunker import ChunkStore, check_chunk_size
from converter.errors import BadTarError, OptionError
from rafs.codec import decode_chunk
from rafs.model import BLOCK_SIZE, CHUNK_COMPRESSED, Node

CS = 16 << 10


def _file(store: ChunkStore, writer, data: bytes) -> Node:  # type: ignore[no-untyped-def]
    node = Node(mode=0o100644)
    writer.add_file(node, io.BytesIO(data), len(data))
    return node


def _read(store: ChunkStore, node: Node) -> bytes:
    out = bytearray()
    for i, ref in enumerate(node.chunks):
        if ref is None:
            out += bytes(min(store.chunk_size, node.size - i * store.chunk_size))
            continue
        c = store.chunks[ref]
        with open(store.blob_files[c.blob_index], "rb") as f:
            f.seek(c.compressed_offset)
            out += decode_chunk(c, f.read(c.compressed_size))
    return bytes(out)


@pytest.fixture
def store(tmp_path: Path):
    s = ChunkStore(tmp_path, CS, "zstd", 3, workers=2)
    yield s
    s.close()


def test_file_is_cut_into_fixed_chunks_and_reads_back(store: ChunkStore) -> None:
    data = os.urandom(3 * CS + 100)
    w = store.begin_layer()
    node = _file(store, w, data)
    blob = w.finish()
    assert blob is not None and node.size == len(data)
    assert len(node.chunks) == 4
    assert [store.chunks[r].uncompressed_size for r in node.chunks] == [CS, CS, CS, 100]
    assert _read(store, node) == data


def test_dedup_within_a_layer(store: ChunkStore) -> None:
    data = os.urandom(2 * CS)
    w = store.begin_layer()
    a = _file(store, w, data)
    b = _file(store, w, data + data[:CS])
    w.finish()
    assert b.chunks == [*a.chunks, a.chunks[0]]
    assert len(store.chunks) == 2
    assert store.blobs[0].compressed_size == os.path.getsize(store.blob_files[0])


def test_dedup_across_layers_refers_to_the_earlier_blob(store: ChunkStore) -> None:
    data = os.urandom(2 * CS)
    w1 = store.begin_layer()
    a = _file(store, w1, data)
    assert w1.finish() is not None
    w2 = store.begin_layer()
    b = _file(store, w2, data[CS:] + os.urandom(CS))
    blob2 = w2.finish()
    assert blob2 is not None
    assert b.chunks[0] == a.chunks[1]
    assert store.chunks[b.chunks[0]].blob_index == 0
    assert store.chunks[b.chunks[1]].blob_index == 1


def test_a_layer_without_new_chunks_has_no_blob(store: ChunkStore) -> None:
    data = os.urandom(CS)
    w1 = store.begin_layer()
    _file(store, w1, data)
    w1.finish()
    w2 = store.begin_layer()
    _file(store, w2, data)
    _file(store, w2, bytes(3 * CS))  # holes only
    _file(store, w2, b"")
    assert w2.finish() is None
    assert len(store.blobs) == 1 and len(store.blob_files) == 1
    w3 = store.begin_layer()
    _file(store, w3, b"new")
    blob3 = w3.finish()
    assert blob3 is not None and store.blobs.index(blob3) == 1  # device numbers stay dense


def test_zero_chunks_are_holes_including_a_short_tail(store: ChunkStore) -> None:
    data = os.urandom(CS) + bytes(CS) + os.urandom(CS) + bytes(500)
    w = store.begin_layer()
    node = _file(store, w, data)
    w.finish()
    assert node.chunks[1] is None and node.chunks[3] is None
    assert node.chunks[0] is not None and node.chunks[2] is not None
    assert _read(store, node) == data


def test_uncompressed_offsets_are_block_aligned_and_packed(store: ChunkStore) -> None:
    w = store.begin_layer()
    for size in (1, 5000, CS, 4096, 12345):
        _file(store, w, os.urandom(size))
    blob = w.finish()
    assert blob is not None
    offsets = [(c.uncompressed_offset, c.uncompressed_size) for c in store.chunks]
    expect, pos = [], 0
    for _off, size in offsets:
        expect.append(pos)
        pos = -(-(pos + size) // BLOCK_SIZE) * BLOCK_SIZE
    assert [o for o, _ in offsets] == expect
    assert all(o % BLOCK_SIZE == 0 for o, _ in offsets)
    assert blob.uncompressed_size == pos and pos % BLOCK_SIZE == 0
    compressed = [(c.compressed_offset, c.compressed_size) for c in store.chunks]
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(compressed))


def test_compressible_chunks_are_zstd_random_ones_raw(store: ChunkStore) -> None:
    w = store.begin_layer()
    text = _file(store, w, b"hello world " * 2000)
    rand = _file(store, w, os.urandom(CS))
    w.finish()
    assert store.chunks[text.chunks[0]].flags & CHUNK_COMPRESSED  # type: ignore[index]
    c = store.chunks[rand.chunks[0]]  # type: ignore[index]
    assert not c.flags & CHUNK_COMPRESSED and c.compressed_size == c.uncompressed_size


def test_compression_none_stores_raw(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, CS, "none", 3, workers=0) as s:
        w = s.begin_layer()
        node = _file(s, w, b"a" * CS)
        w.finish()
        c = s.chunks[node.chunks[0]]  # type: ignore[index]
        assert c.flags == 0 and c.compressed_size == CS


def test_output_does_not_depend_on_thread_count(tmp_path: Path) -> None:
    files = [os.urandom(n) for n in (CS * 5 + 7, 100, CS)] + [b"text " * 30000]
    files.append(files[0][CS:])  # misaligned copy: no dedup
    files.append(files[0][: 2 * CS])  # aligned prefix: dedup
    results = []
    for workers in (0, 1, 4):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        with ChunkStore(d, CS, "zstd", 3, workers=workers) as s:
            w = s.begin_layer()
            nodes = [_file(s, w, f) for f in files]
            blob = w.finish()
            assert blob is not None
            results.append((blob.digest, [n.chunks for n in nodes], s.chunks))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("size", [0, 1000, 4095, 3 << 12, 32 << 20])
def test_bad_chunk_sizes_are_rejected(size: int) -> None:
    with pytest.raises(OptionError):
        check_chunk_size(size)


@pytest.mark.parametrize("size", [4 << 10, 1 << 20, 16 << 20])
def test_good_chunk_sizes(size: int) -> None:
    assert check_chunk_size(size) == size


def test_bad_compression_and_level_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(OptionError):
        ChunkStore(tmp_path, CS, "lz4", 3)
    with pytest.raises(OptionError):
        ChunkStore(tmp_path, CS, "zstd", 30)


def test_short_data_is_a_bad_tar(store: ChunkStore) -> None:
    w = store.begin_layer()
    with pytest.raises(BadTarError, match="ends after"):
        w.add_file(Node(mode=0o100644), io.BytesIO(b"abc"), 10)
    w.abort()


def test_prefetch_chunks_go_to_the_front_in_rank_order(store: ChunkStore) -> None:
    w = store.begin_layer()
    plain1 = _file(store, w, os.urandom(2 * CS))
    late = Node(mode=0o100644)
    w.add_file(late, io.BytesIO(late_data := os.urandom(CS + 10)), len(late_data), [5, 6])
    plain2 = _file(store, w, os.urandom(3000))
    early = Node(mode=0o100644)
    w.add_file(early, io.BytesIO(early_data := os.urandom(CS)), len(early_data), [1])
    blob = w.finish()
    assert blob is not None

    def place(node: Node) -> list[int]:
        return [store.chunks[r].compressed_offset for r in node.chunks]  # type: ignore[index]

    order = sorted([*place(plain1), *place(late), *place(plain2), *place(early)])
    assert place(early) == order[:1]
    assert place(late) == order[1:3]
    assert place(plain1) + place(plain2) == order[3:]
    for node, data in ((early, early_data), (late, late_data)):
        assert _read(store, node) == data
    blob_bytes = store.blob_files[0].read_bytes()
    assert blob.digest == "sha256:" + hashlib.sha256(blob_bytes).hexdigest()
    assert blob.compressed_size == len(blob_bytes)
    spans = sorted((c.uncompressed_offset, c.uncompressed_size) for c in store.chunks)
    assert all(o % BLOCK_SIZE == 0 for o, _ in spans)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert blob.uncompressed_size >= spans[-1][0] + spans[-1][1]
    assert not list(store.workdir.glob("*.front.tmp"))


def test_prefetch_only_blob(store: ChunkStore) -> None:
    w = store.begin_layer()
    node = Node(mode=0o100644)
    w.add_file(node, io.BytesIO(data := os.urandom(CS * 2)), len(data), [0, 1])
    blob = w.finish()
    assert blob is not None and _read(store, node) == data
    assert [store.chunks[r].compressed_offset for r in node.chunks] == [  # type: ignore[index]
        0, store.chunks[node.chunks[0]].compressed_size]  # type: ignore[index]
