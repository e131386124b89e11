"""What an unoptimized image fetches from a real registry for a read, in both modes.

The image is converted with the converter's defaults (1 MiB chunks, no prefetch
list) and its files lie back to back in tar order; the registry's access log
says what the daemon asked for. Reads of one file must not pull in other files'
chunks (the tar-order amplification the read-ahead policy replaced).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.registry import RegistryServer
from rafs.bootstrap import Bootstrap
from rafs.image import open_local_image
from tests.helpers.mounts import mounted, read_stats
from tests.helpers.ocibuild import build_oci_image, dir_entry, file_entry

pytestmark = [pytest.mark.fuse]
MODES = ("fuse", pytest.param("kernel", marks=pytest.mark.kernel))
SMALL = 4096


@pytest.fixture(scope="module")
def files_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A big file first, then 40 small incompressible files, then another big one."""
    rng = random.Random(14)
    files = {"data/a-big.bin": rng.randbytes(3 << 20)}
    files.update({f"data/lib/f{i:03d}.bin": rng.randbytes(SMALL) for i in range(40)})
    files["data/z-big.bin"] = rng.randbytes(2 << 20)
    entries = [dir_entry("data"), dir_entry("data/lib"),
               *(file_entry(p, d) for p, d in files.items())]
    layout = tmp_path_factory.mktemp("readahead-src") / "oci"
    build_oci_image(layout, "v1", [entries])
    return layout, files


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer, files_image: tuple[Path, dict[str, bytes]],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Bootstrap]:
    from converter.convert import ConvertOptions, convert

    layout, _ = files_image
    ref = registry.ref("readahead/files", "v1")
    convert(f"oci:{layout}:v1", ref, ConvertOptions(progress=False))
    local = tmp_path_factory.mktemp("readahead-rafs") / "oci"
    convert(f"oci:{layout}:v1", f"oci:{local}:v1", ConvertOptions(progress=False))
    return ref, Bootstrap.from_bytes(open_local_image(f"oci:{local}:v1").bootstrap)


def _file_chunks(boot: Bootstrap, path: str) -> list[int]:
    node = boot.root
    for name in path.split("/"):
        nid = boot.lookup(node, name.encode())
        assert nid is not None, path
        node = boot.inode(nid)
    return [i for i in boot.file_chunks(node) if i is not None]


def _data_gets(registry: RegistryServer, boot: Bootstrap) -> list[tuple[str, int]]:
    """(blob digest, bytes) of every data-blob GET since the mark (the bootstrap's left out)."""
    data = {b.digest for b in boot.blobs}
    out = []
    for r in registry.access_log(since_mark=True):
        if r.method == "GET" and "/blobs/" in r.path:
            digest = r.path.rsplit("/", 1)[1]
            if digest in data:
                out.append((digest, r.body_bytes))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_reading_one_4k_file_fetches_at_most_its_chunk(
        mode: str, tmp_path: Path, registry: RegistryServer,
        files_image: tuple[Path, dict[str, bytes]], image_ref: tuple[str, Bootstrap]) -> None:
    _, files = files_image
    ref, boot = image_ref
    [chunk] = _file_chunks(boot, "data/lib/f017.bin")
    limit = boot.chunk(chunk).compressed_size
    registry.mark()
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode=mode) as mp:
        assert (mp / "data/lib/f017.bin").read_bytes() == files["data/lib/f017.bin"]
        gets = _data_gets(registry, boot)
    assert len(gets) <= 1, gets
    assert sum(n for _, n in gets) <= limit, (gets, limit)


@pytest.mark.parametrize("mode", MODES)
def test_reading_one_big_file_through_fetches_no_byte_of_its_neighbours(
        mode: str, tmp_path: Path, registry: RegistryServer,
        files_image: tuple[Path, dict[str, bytes]], image_ref: tuple[str, Bootstrap]) -> None:
    _, files = files_image
    ref, boot = image_ref
    limit = sum(boot.chunk(i).compressed_size for i in _file_chunks(boot, "data/a-big.bin"))
    registry.mark()
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode=mode) as mp:
        assert (mp / "data/a-big.bin").read_bytes() == files["data/a-big.bin"]
        gets = _data_gets(registry, boot)
        coverage = read_stats(mp)["stats"]["coverage"]  # type: ignore[index]
    assert gets
    assert sum(n for _, n in gets) <= limit, (gets, limit)
    # every byte of the three chunks fetched was read
    assert coverage["chunks"] == 3 and coverage["fraction_read"] == 1.0, coverage
    assert coverage["fetched_bytes"] == len(files["data/a-big.bin"]), coverage


@pytest.mark.parametrize("mode", MODES)
def test_first_reads_of_small_files_of_a_directory_come_in_batches(
        mode: str, tmp_path: Path, registry: RegistryServer,
        files_image: tuple[Path, dict[str, bytes]], image_ref: tuple[str, Bootstrap]) -> None:
    """Reading the 40 small files of data/lib in order takes far fewer requests than
    40, and nothing of the big files around them."""
    _, files = files_image
    ref, boot = image_ref
    small = sorted(p for p in files if p.startswith("data/lib/"))
    limit = sum(boot.chunk(i).compressed_size for p in small for i in _file_chunks(boot, p))
    registry.mark()
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode=mode) as mp:
        for p in small:
            assert (mp / p).read_bytes() == files[p]
        gets = _data_gets(registry, boot)
    assert len(gets) < len(small) // 4, gets
    assert sum(n for _, n in gets) <= limit, (gets, limit)
