"""The bootstrap validator: what it accepts, what it refuses (one line, offset and rule),
that an accepted bootstrap never trips the reader, and the stamps that let a
cached bootstrap skip it."""

from __future__ import annotations

import contextlib
import os
import random
import stat
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from fused.fuseops import Operations
from fused.stats import Stats
from fused.vfs import Vfs
from rafs import erofs, section
from rafs import validate as validator
from rafs.bootstrap import Bootstrap, stamp_path_of
from rafs.errors import FormatError
from rafs.fsck import fsck_erofs
from tests.helpers import fuzzing, mutate


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> fuzzing.Seed:
    return fuzzing.Seed.build(tmp_path_factory.mktemp("seed"))


def field(seed: fuzzing.Seed, kind: str, label: str | None = None, n: int = 0) -> mutate.Field:
    found = [f for f in seed.fields if f.kind == kind and (label is None or f.label == label)]
    return found[n]


def with_value(seed: fuzzing.Seed, f: mutate.Field, value: int) -> bytes:
    buf = bytearray(seed.bootstrap)
    mutate._set(buf, f, value)
    return bytes(buf)


def refusal(data: bytes) -> str:
    with pytest.raises(FormatError) as e:
        validator.validate(data)
    message = str(e.value)
    assert "\n" not in message and message.startswith("bad bootstrap at offset 0x")
    return message


def test_the_seed_and_its_kinds_of_entries_are_accepted(seed):
    v = validator.validate(seed.bootstrap)
    assert v.blobs == 2 and v.directories >= 6 and v.chunk_refs > v.chunks > 100
    assert fsck_erofs(_write(seed), v.blobs)


def _write(seed: fuzzing.Seed) -> Path:
    path = seed.work / "bootstrap"
    path.write_bytes(seed.bootstrap)
    return path


def _first_dir_nid(seed: fuzzing.Seed, name: bytes) -> int:
    boot = Bootstrap.from_bytes(seed.bootstrap)
    nid = boot.lookup(boot.root, name)
    assert nid is not None
    return nid


RULES = [
    # (what, field kind, label or None, value, fragment of the message)
    ("unknown header flags", "header.flags", None, 1, "unknown header flags"),
    ("a compat feature", "super.feature_compat", None, 1, "compat features"),
    ("a compression feature", "super.feature_incompat", None, 0x1f, "incompat features"),
    ("a packed inode", "super.packed_nid", None, 5, "reserved or unsupported"),
    ("too few devices", "super.extra_devices", None, 1, "extra devices"),
    ("a short EROFS area", "super.blocks", None, 1, "does not end where"),
    ("a device of the wrong size", "device.blocks", "device 1", 1, "device 1 is 1 blocks"),
    ("chunk ranges that miss a record", "blob.chunk_count", "blob 1", 0, "blobs hold"),
    ("an oversized chunk", "chunk.uncompressed_size", "chunk 3", 1 << 30,
     "chunk 3: uncompressed size"),
    ("a compressed size past the uncompressed", "chunk.compressed_size", "chunk 3", 1 << 30,
     "chunk 3: compressed size"),
    ("a misaligned chunk", "chunk.uncompressed_offset", "chunk 3", 4097, "block-aligned"),
    ("chunks out of order", "chunk.uncompressed_offset", "chunk 3", 0, "out of order"),
    ("a chunk past its blob", "chunk.compressed_offset", "chunk 3", 1 << 40, "ends at"),
    ("a record naming another blob", "chunk.blob", "chunk 3", 1, "names blob 1"),
    ("unknown chunk flags", "chunk.flags", "chunk 3", 4, "unknown flags"),
    ("a chunk index to nowhere", "chunkindex.blkaddr", None, 0x7FFFFF, "no chunk at block"),
    ("a chunk index naming device 0", "chunkindex.device", None, 0, "names device 0"),
    ("an unknown file type", "inode.mode", None, 0o170644, "unknown file type"),
    ("a compressed inode layout", "inode.format", None, 2, "unsupported inode format"),
    ("link count 0", "inode.nlink", None, 0, "link count 0"),
    ("a dirent of the wrong type", "dirent.file_type", None, 7, "file type"),
    ("a dirent to nid 0", "dirent.nid", None, 0, "'.' of directory"),
    ("a prefetch entry to no file", "prefetch.nid", None, 3, "prefetch entry 0"),
    ("a miscounted superblock", "super.inos", None, 1, "superblock counts"),
    ("a build time no mtime can hold", "super.build_time", None, (1 << 64) - 1,
     "build time"),
    ("a name filter", "xattr.name_filter", None, 1, "name filter"),
]


@pytest.mark.parametrize(("what", "kind", "label", "value", "fragment"), RULES,
                         ids=[r[0] for r in RULES])
def test_each_rule_is_refused_with_one_line(seed, what, kind, label, value, fragment):
    message = refusal(with_value(seed, field(seed, kind, label), value))
    assert fragment in message, message


def test_a_file_size_that_does_not_match_its_chunks_is_refused(seed):
    boot = Bootstrap.from_bytes(seed.bootstrap)
    nid = boot.lookup(boot.inode(boot.lookup(boot.root, b"usr")), b"bin")
    tool = boot.lookup(boot.inode(nid), b"tool")
    for size in (5, 3 * fuzzing.CHUNK_SIZE + 124, 4 * fuzzing.CHUNK_SIZE + 1):
        assert "the file needs" in refusal(
            with_value(seed, field(seed, "inode.size", f"nid {tool}"), size))


def test_loops_and_second_names_of_directories_are_refused(seed):
    deep = _first_dir_nid(seed, b"deep")
    dirents = [f for f in seed.fields if f.kind == "dirent.nid"]
    boot = Bootstrap.from_bytes(seed.bootstrap)
    # In deep/a: point "b" (a directory) back at "deep": a loop.
    a = boot.inode(boot.lookup(boot.inode(deep), b"a"))
    b_nid = boot.lookup(a, b"b")
    target = next(f for f in dirents if mutate._get(seed.bootstrap, f) == b_nid)
    message = refusal(with_value(seed, target, deep))
    assert "second name" in message or "'..'" in message


def test_a_bootstrap_with_trailing_or_missing_bytes_is_refused(seed):
    assert "after the prefetch table" in refusal(seed.bootstrap + b"\0")
    for cut in (0, 100, 1100, len(seed.bootstrap) // 2, len(seed.bootstrap) - 1):
        refusal(seed.bootstrap[:cut])


def test_names_out_of_order_are_refused(seed):
    boot = Bootstrap.from_bytes(seed.bootstrap)
    wide = boot.inode(boot.lookup(boot.root, b"wide"))
    # The first block of /wide: swap the first byte of two names' tails.
    start = wide.i_u * erofs.BLOCK_SIZE
    buf = bytearray(seed.bootstrap)
    off0 = struct.unpack_from("<H", buf, start + 8)[0]
    last = start + off0 + 40
    buf[last] = ord("~")
    assert "out of order" in refusal(bytes(buf)) or "bad name" in refusal(bytes(buf))


def test_symlinks_with_nul_and_inline_data_past_its_block_are_refused(seed):
    boot = Bootstrap.from_bytes(seed.bootstrap)
    nid = boot.lookup(boot.root, b"dangling")
    ino = boot.inode(nid)
    buf = bytearray(seed.bootstrap)
    buf[ino.tail_off + 3] = 0
    assert "NUL" in refusal(bytes(buf))
    size = field(seed, "inode.size", f"nid {nid}")
    assert "crosses its block" in refusal(with_value(seed, size, 4000))


def test_sizes_in_the_image_never_drive_an_allocation(seed):
    """Edge values in every count and size field: refused in bounded time and memory."""
    kinds = {"header.chunk_count", "header.blob_count", "header.prefetch_count",
             "blob.chunk_count", "blob.uncompressed_size", "blob.compressed_size",
             "inode.size", "inode.xattr_icount", "super.inos", "chunk.uncompressed_size",
             "chunk.compressed_size", "dirent.nameoff"}
    for f in seed.fields:
        if f.kind in kinds and (f.label in ("", "blob 0", "chunk 0") or f.kind.startswith(
                ("inode", "dirent"))) and random.Random(f.offset).random() < 0.2:
            for value in (0, (1 << 8 * f.width) - 1, 1 << (8 * f.width - 1)):
                with contextlib.suppress(FormatError):
                    validator.validate(with_value(seed, f, value))


def test_an_accepted_bootstrap_never_trips_the_reader(seed):
    """The validator's promise: whatever it accepts, every reader call answers, and every
    attribute fits what the adapter hands the kernel (pyfuse3's C types)."""
    rng = random.Random(2024)
    accepted = 0
    for _ in range(400):
        data, what = mutate.mutate_bootstrap(seed.bootstrap, rng, seed.fields)
        try:
            boot = Bootstrap.from_bytes(data)
        except FormatError:
            continue
        accepted += 1
        vfs = Vfs(boot, SimpleNamespace(cache=None, stats=Stats()))  # type: ignore[arg-type]
        ops = Operations(vfs)
        try:
            trio.run(ops.statfs, None)
            for _path, ino in boot.walk():
                Operations._entry(vfs.attr_of(ino))  # OverflowError if a field cannot fit
                boot.xattrs(ino)
                if stat.S_ISREG(ino.mode):
                    for ref in boot.file_chunks(ino):
                        if ref is not None:
                            boot.chunk(ref)
                elif stat.S_ISLNK(ino.mode):
                    boot.readlink(ino)
                elif ino.is_dir:
                    for name, nid, _c in boot.readdir(ino):
                        assert boot.lookup(ino, name) == nid
            for k in range(len(boot.blobs)):
                boot.blob_extents(k)
        except FormatError as e:
            pytest.fail(f"accepted ({what}) but the reader says: {e}")
    assert accepted > 40


def test_a_stamp_skips_the_walk_until_the_file_changes(seed, tmp_path, monkeypatch):
    path = tmp_path / "boot"
    path.write_bytes(seed.bootstrap)
    Bootstrap.open(path, stamp=True).close()
    stamp = stamp_path_of(path)
    assert stamp.name == ".boot.validated"
    assert stamp.read_text().startswith(f"rafs-validate {validator.VERSION} ")
    calls = []
    real = validator.validate
    monkeypatch.setattr(validator, "validate", lambda buf: calls.append(1) or real(buf))
    Bootstrap.open(path, stamp=True).close()
    assert calls == []
    Bootstrap.open(path).close()  # without stamp=True: always validated
    assert calls == [1]
    Bootstrap.open(path, stamp=True, fsck=True).close()  # the stamp does not cover fsck
    assert len(calls) == 2 and stamp.read_text().rstrip().endswith("fsck.erofs")
    Bootstrap.open(path, stamp=True, fsck=True).close()
    assert len(calls) == 2
    bad = bytearray(seed.bootstrap)
    mutate._set(bad, field(seed, "header.flags"), 1)
    path.write_bytes(bytes(bad))  # same name, other bytes: the stamp no longer applies
    with pytest.raises(FormatError, match="header flags"):
        Bootstrap.open(path, stamp=True)
    stamp.write_text(stamp.read_text().replace(f"rafs-validate {validator.VERSION} ",
                                               "rafs-validate 0 "))
    with pytest.raises(FormatError):
        Bootstrap.open(path, stamp=True)


def test_fsck_erofs_refusing_is_one_line(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(FormatError) as e:
        fsck_erofs(path, 1)
    assert "fsck.erofs refuses it" in str(e.value) and "\n" not in str(e.value)


def test_the_chunk_table_layout_is_what_the_section_says(seed):
    hdr = section.Header.unpack(seed.bootstrap)
    assert hdr.prefetch_off + 8 * hdr.prefetch_count == len(seed.bootstrap)


def test_the_cache_lists_no_stamp_as_a_bootstrap_and_removes_it_with_its_bootstrap(seed,
                                                                                 tmp_path):
    import hashlib

    from fused.evict import bootstrap_files, remove_bootstrap

    digest = hashlib.sha256(seed.bootstrap).hexdigest()
    path = tmp_path / "bootstraps" / "sha256" / digest
    path.parent.mkdir(parents=True)
    path.write_bytes(seed.bootstrap)
    Bootstrap.open(path, stamp=True).close()
    assert stamp_path_of(path).exists()
    assert [d for d, _p, _m in bootstrap_files(tmp_path)] == [f"sha256:{digest}"]
    assert remove_bootstrap(tmp_path, f"sha256:{digest}", path, None) > 0
    assert not path.exists() and not stamp_path_of(path).exists()
