"""`rafs convert --prefetch-list`: the start-up set laid out in access order, recorded as
chunk ranges in the bootstrap, compressed at its own level, with dictionaries.

Every image here is converted from a synthetic OCI layout and read back with the
bootstrap reader, `rafs check` logic (every chunk decoded and verified) and
`fsck.erofs`; the assertions are on the bytes the converter wrote.
"""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import pytest

from converter import cli as convert_cli
from converter.convert import ConvertOptions, convert
from converter.errors import OptionError
from rafs import image as rafs_image
from rafs.bootstrap import Bootstrap
from rafs.model import CHUNK_DICT
from rafs.oci import OCILayout
from rafs.prefetchlist import Entry
from tests.helpers.images import write_flat_blobs
from tests.helpers.ocibuild import build_oci_image, dir_entry, file_entry

CS = 64 << 10
rng = random.Random(14)


def _text(n: int) -> bytes:
    """Compressible, file-like bytes (words from a small vocabulary)."""
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


LIB = rng.randbytes(6 * CS) + _text(2 * CS)  # 8 chunks
BIN = _text(3 * CS + 100)  # 4 chunks
SMALL = {f"usr/lib/py/m{i:03d}.pyc": b"\x00PYC" + _text(rng.randint(1500, 9000))
         for i in range(320)}
LAYERS = [
    [dir_entry("usr"), dir_entry("usr/lib"), file_entry("usr/lib/libc.so", LIB),
     file_entry("usr/lib/unused", rng.randbytes(5 * CS)), file_entry("etc-motd", _text(3000))],
    [dir_entry("usr/bin"), file_entry("usr/bin/tool", BIN), dir_entry("usr/lib/py"),
     *(file_entry(name, data) for name, data in SMALL.items()),
     file_entry("usr/lib/libc.so.copy", LIB[:2 * CS]),  # shares libc's first two chunks
     file_entry("usr/bin/unused", rng.randbytes(3 * CS))],
]
# What a start reads, in order: bits of the tool, of libc, every small module, more of both.
TRACE = [Entry(b"/usr/bin/tool", 0, 4096), Entry(b"/usr/lib/libc.so", 5 * CS, 2 * CS),
         *(Entry(b"/" + name.encode(), 0, len(data)) for name, data in SMALL.items()),
         Entry(b"/usr/bin/tool", 2 * CS, CS + 100), Entry(b"/usr/lib/libc.so", 0, 4096)]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("startup") / "src"
    build_oci_image(path, "v1", LAYERS)
    return f"oci:{path}:v1"


def _convert(src: str, dst: Path, **kw: object) -> tuple[str, Bootstrap]:
    options = ConvertOptions(chunk_size=CS, progress=False, **kw)  # type: ignore[arg-type]
    result = convert(src, f"oci:{dst}:x", options)
    img = rafs_image.open_local_image(f"oci:{dst}:x")
    assert rafs_image.check(img) == result.chunks  # every chunk decodes and verifies
    return result.manifest.digest, Bootstrap.from_bytes(img.bootstrap)


def _file_chunks(boot: Bootstrap, path: bytes) -> list[int | None]:
    node = boot.root
    for part in path.strip(b"/").split(b"/"):
        nid = boot.lookup(node, part)
        assert nid is not None, path
        node = boot.inode(nid)
    return boot.file_chunks(node)


def _traced_chunks(boot: Bootstrap) -> list[int]:
    """The chunks TRACE reads, in first-access order, each once."""
    order: dict[int, None] = {}
    for e in TRACE:
        chunks = _file_chunks(boot, e.path)
        assert e.length is not None
        for k in range(e.offset // CS, (e.offset + e.length - 1) // CS + 1):
            if chunks[k] is not None:
                order.setdefault(chunks[k])
    return list(order)


def _runs(boot: Bootstrap, chunks: list[int]) -> dict[int, int]:
    """Per blob: how many contiguous stretches of the compressed blob ``chunks`` cover."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for i in chunks:
        c = boot.chunk(i)
        spans.setdefault(c.blob_index, []).append((c.compressed_offset, c.compressed_size))
    runs = {}
    for blob, s in spans.items():
        s.sort()
        runs[blob] = 1 + sum(b[0] != a[0] + a[1] for a, b in itertools.pairwise(s))
    return runs


def test_the_startup_set_is_one_contiguous_range_per_blob_in_access_order(
        src: str, tmp_path: Path) -> None:
    _, boot = _convert(src, tmp_path / "dst", prefetch=TRACE)
    assert boot.header.version == 2
    startup = boot.prefetch_chunks()
    assert startup == _traced_chunks(boot)  # exactly what was read, in that order
    assert _runs(boot, startup) == {0: 1, 1: 1}  # k = 1 contiguous range per blob
    for blob_index, blob in enumerate(boot.blobs):
        mine = [i for i in startup if boot.chunk(i).blob_index == blob_index]
        offsets = [boot.chunk(i).compressed_offset for i in mine]
        assert offsets[0] == 0  # the blob starts with them ...
        assert offsets == sorted(offsets)  # ... in the order they are read
        assert blob.chunk_count > len(mine)  # and the rest follows
    # the table holds runs, fewer than the chunks they cover
    assert sum(n for _, n in boot.prefetch_ranges) == len(startup)
    assert len(boot.prefetch_ranges) < len(startup)
    # files named by the list, for inspect and for readers of the nid table
    assert len(boot.prefetch) == len({e.path for e in TRACE})


def test_a_chunk_met_first_outside_the_list_moves_up_to_where_it_is_read(
        src: str, tmp_path: Path) -> None:
    # libc.so.copy (layer 2) shares libc's first two chunks; listing only the copy's
    # first chunk after an unlisted read of it still puts it in front of its blob.
    trace = [Entry(b"/usr/bin/tool", 0, 10), Entry(b"/usr/lib/libc.so.copy", 0, 10)]
    _, boot = _convert(src, tmp_path / "dst", prefetch=trace)
    copy = _file_chunks(boot, b"/usr/lib/libc.so.copy")
    assert copy[0] == _file_chunks(boot, b"/usr/lib/libc.so")[0]  # deduplicated
    assert boot.prefetch_chunks() == [_file_chunks(boot, b"/usr/bin/tool")[0], copy[0]]
    assert boot.chunk(copy[0]).compressed_offset == 0  # first in blob 0


def test_a_hand_written_path_list_still_works(src: str, tmp_path: Path) -> None:
    listing = tmp_path / "prefetch.txt"
    listing.write_bytes(b"# start-up files\n/usr/bin/tool\n/usr/lib/py\n/not/there\n")
    parser = convert_cli.argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", src, f"oci:{tmp_path / 'dst'}:x", "--chunk-size",
                              "64K", "--prefetch-list", str(listing)])
    assert args.func(args) == 0
    img = rafs_image.open_local_image(f"oci:{tmp_path / 'dst'}:x")
    rafs_image.check(img)
    boot = Bootstrap.from_bytes(img.bootstrap)
    tool = [i for i in _file_chunks(boot, b"/usr/bin/tool") if i is not None]
    modules = [i for name in sorted(SMALL)
               for i in _file_chunks(boot, b"/" + name.encode()) if i is not None]
    assert boot.prefetch_chunks() == tool + modules  # whole files, in list order
    assert _runs(boot, boot.prefetch_chunks()) == {1: 1}
    assert len(boot.prefetch) == 2  # /not/there is skipped (with a warning)


def test_a_bad_prefetch_list_is_one_error(tmp_path: Path) -> None:
    listing = tmp_path / "prefetch.txt"
    listing.write_bytes(b"/ok\n12 /half-a-range\n")
    parser = convert_cli.argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "oci:x:y", f"oci:{tmp_path / 'd'}:x",
                              "--prefetch-list", str(listing)])
    with pytest.raises(OptionError, match=r"prefetch\.txt:2: "):
        args.func(args)


def test_same_input_and_trace_give_the_same_digests(src: str, tmp_path: Path) -> None:
    kw = {"prefetch": TRACE, "startup_level": 9, "dictionary": True, "workers": 2}
    first, _ = _convert(src, tmp_path / "a", **kw)
    second, _ = _convert(src, tmp_path / "b", **{**kw, "workers": 0})
    assert first == second
    a, b = OCILayout(tmp_path / "a"), OCILayout(tmp_path / "b")
    assert sorted(a.iter_blobs()) == sorted(b.iter_blobs())


def test_dictionary_chunks_decode_with_their_blobs_dictionary_only(
        src: str, tmp_path: Path) -> None:
    _, plain = _convert(src, tmp_path / "plain", prefetch=TRACE)
    _, boot = _convert(src, tmp_path / "dict", prefetch=TRACE, dictionary=True)
    assert boot.dictionary(0) is None  # layer 1 has no small start-up chunks to learn from
    dictionary = boot.dictionary(1)
    assert dictionary is not None and 0 < len(dictionary) <= 112 << 10
    with_dict = [i for i in boot.prefetch_chunks() if boot.chunk(i).flags & CHUNK_DICT]
    assert len(with_dict) >= len(SMALL) // 10  # where the dictionary made them smaller
    assert all(boot.chunk(i).blob_index == 1 for i in with_dict)

    def startup_bytes(b: Bootstrap) -> int:
        return sum(b.chunk(i).compressed_size for i in b.prefetch_chunks())

    saved = startup_bytes(plain) - startup_bytes(boot)
    assert saved > 0  # net of the dictionary is what bench.compression measures
    # a chunk with the flag does not decode without the dictionary (never wrong bytes)
    from rafs.codec import Dictionary, decode_chunk
    from rafs.errors import DigestError

    img = rafs_image.open_local_image(f"oci:{tmp_path / 'dict'}:x")
    c = boot.chunk(with_dict[0])
    with img.open_blob(boot.blobs[1].digest) as f:
        f.seek(c.compressed_offset)
        payload = f.read(c.compressed_size)
    with pytest.raises(DigestError):
        decode_chunk(c, payload)
    with pytest.raises(DigestError):
        decode_chunk(c, payload, Dictionary(b"x" * 64))
    assert len(decode_chunk(c, payload, dictionary)) == c.uncompressed_size


def test_a_startup_level_makes_only_the_startup_set_smaller(src: str, tmp_path: Path) -> None:
    _, base = _convert(src, tmp_path / "l3", prefetch=TRACE)
    _, high = _convert(src, tmp_path / "l19", prefetch=TRACE, startup_level=19)

    def sizes(b: Bootstrap) -> tuple[int, int]:
        startup = set(b.prefetch_chunks())
        inside = sum(b.chunk(i).compressed_size for i in startup)
        return inside, sum(c.compressed_size for c in b.chunks()) - inside

    assert sizes(high)[0] < sizes(base)[0]
    assert sizes(high)[1] == sizes(base)[1]


def test_a_version_2_bootstrap_passes_fsck_erofs(src: str, tmp_path: Path) -> None:
    _convert(src, tmp_path / "dst", prefetch=TRACE, dictionary=True)
    boot, flats = write_flat_blobs(f"oci:{tmp_path / 'dst'}:x", tmp_path / "flat")
    res = subprocess.run(["fsck.erofs", *(f"--device={f}" for f in flats), str(boot)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_without_a_list_the_bootstrap_stays_version_1(src: str, tmp_path: Path) -> None:
    _, boot = _convert(src, tmp_path / "dst")
    assert boot.header.version == 1
    assert boot.prefetch_ranges == [] and boot.prefetch_chunks() == []
