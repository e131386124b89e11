"""`rafs convert` end to end: OCI layout or docker archive in, RAFS image out.

The output is read back with the bootstrap reader and `rafs check` logic
(rafs.image), so these tests prove the converter and the format agree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from pathlib import Path

import pytest

from converter import cli as convert_cli
from converter.convert import ConvertOptions, convert
from converter.errors import ConvertError, LayerDigestError, OptionError, UnsafePathError
from rafs import image as rafs_image
from rafs import oci, sizes
from rafs.bootstrap import Bootstrap
from rafs.errors import ImageError
from rafs.oci import OCILayout
from tests.helpers.ocibuild import (
    Entry,
    build_docker_archive,
    build_oci_image,
    dir_entry,
    file_entry,
    symlink_entry,
    whiteout,
)

OPTS = ConvertOptions(chunk_size=64 << 10, progress=False)
BIG = os.urandom(300_000)

LAYERS = [
    [dir_entry("etc"), file_entry("etc/os-release", b"ID=test\n"), file_entry("big", BIG),
     file_entry("etc/text", b"hello world\n" * 20_000),
     dir_entry("bin"), file_entry("bin/busybox", b"\x7fELF" + BIG[:70_000], mode=0o755),
     Entry("bin/sh", "hardlink", linkname="bin/busybox"), symlink_entry("sbin", "bin")],
    [whiteout("etc/os-release"), file_entry("etc/hostname", b"box\n"),
     file_entry("copy-of-big", BIG)],
    [file_entry("etc/hostname", b"box\n")],  # no new data at all: no blob
]


def _src(tmp_path: Path, layers: list[list[Entry]] = LAYERS, **kw: object) -> str:
    build_oci_image(tmp_path / "src", "v1", layers, **kw)  # type: ignore[arg-type]
    return f"oci:{tmp_path / 'src'}:v1"


def _files(ref: str) -> dict[bytes, tuple[int, int, bytes]]:
    """path -> (mode, nlink-ish group id, content or target) read from the output bootstrap."""
    img = rafs_image.open_local_image(ref)
    boot = Bootstrap.from_bytes(img.bootstrap)
    out = {}
    for path, ino in boot.walk():
        out[path] = (ino.mode, ino.nid, boot.readlink(ino) if stat.S_ISLNK(ino.mode) else b"")
    return out


def test_convert_produces_a_checked_rafs_image(tmp_path: Path) -> None:
    src = _src(tmp_path)
    dst = f"oci:{tmp_path / 'dst'}:rafs"
    result = convert(src, dst, OPTS)

    img = rafs_image.open_local_image(dst)
    assert rafs_image.check(img) == result.chunks
    m = img.manifest
    assert m.digest == result.manifest.digest
    assert [d.media_type for d in m.layers] == [oci.MEDIA_TYPE_RAFS_BLOB] * 2 + [
        oci.MEDIA_TYPE_RAFS_BOOTSTRAP]
    assert all(d.annotations == {oci.ANNOTATION_RAFS_BLOB: "true"} for d in m.layers[:-1])
    boot = m.layers[-1]
    assert boot.annotations[oci.ANNOTATION_RAFS_BOOTSTRAP] == "true"
    assert boot.annotations[oci.ANNOTATION_RAFS_BOOTSTRAP_DIGEST] == oci.sha256_digest(
        img.bootstrap)
    src_manifest = OCILayout(tmp_path / "src").resolve("v1")
    assert m.annotations == {
        oci.ANNOTATION_RAFS_VERSION: "1",
        oci.ANNOTATION_RAFS_SOURCE_DIGEST: src_manifest.digest,
        oci.ANNOTATION_RAFS_SOURCE_CONFIG: src_manifest.config.digest,
    }

    files = _files(dst)
    assert b"/etc/os-release" not in files
    assert b"/etc/hostname" in files
    assert files[b"/bin/sh"][1] == files[b"/bin/busybox"][1]  # one inode
    assert files[b"/sbin"][2] == b"bin"


def test_config_keeps_runtime_settings_and_rewrites_rootfs_and_history(tmp_path: Path) -> None:
    src = _src(tmp_path)
    dst = f"oci:{tmp_path / 'dst'}:rafs"
    result = convert(src, dst, OPTS)
    layout = OCILayout(tmp_path / "dst")
    config = json.loads(layout.read_blob(result.manifest.config.digest))
    src_layout = OCILayout(tmp_path / "src")
    src_config = json.loads(src_layout.read_blob(src_layout.resolve("v1").config.digest))

    for key in ("config", "os", "architecture", "created"):
        assert config[key] == src_config[key]
    blobs = [d.digest for d in result.manifest.layers[:-1]]
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": [*blobs, result.manifest.layers[-1].annotations[
            oci.ANNOTATION_RAFS_BOOTSTRAP_DIGEST]],
    }
    history = config["history"]
    assert [h.get("empty_layer", False) for h in history] == [False, False, True, False]
    assert history[-1]["created_by"] == "rafs convert"
    assert sum(not h.get("empty_layer") for h in history) == len(config["rootfs"]["diff_ids"])


def test_conversion_is_reproducible(tmp_path: Path) -> None:
    src = _src(tmp_path)
    a = convert(src, f"oci:{tmp_path / 'a'}:x", OPTS)
    b = convert(src, f"oci:{tmp_path / 'b'}:x", ConvertOptions(
        chunk_size=64 << 10, progress=False, workers=0))
    assert a.manifest.raw == b.manifest.raw
    assert sorted(os.listdir(tmp_path / "a" / "blobs" / "sha256")) == sorted(
        os.listdir(tmp_path / "b" / "blobs" / "sha256"))


def test_options_change_the_output(tmp_path: Path) -> None:
    src = _src(tmp_path)
    a = convert(src, f"oci:{tmp_path / 'o'}:a", OPTS)
    b = convert(src, f"oci:{tmp_path / 'o'}:b", ConvertOptions(
        chunk_size=1 << 20, progress=False))
    c = convert(src, f"oci:{tmp_path / 'o'}:c", ConvertOptions(
        chunk_size=64 << 10, compression="none", progress=False))
    assert len({a.manifest.digest, b.manifest.digest, c.manifest.digest}) == 3
    for tag in "abc":
        img = rafs_image.open_local_image(f"oci:{tmp_path / 'o'}:{tag}")
        rafs_image.check(img)
    assert sorted(OCILayout(tmp_path / "o").tags()) == ["a", "b", "c"]


def test_docker_archive_source_gives_the_same_image_content(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    build_docker_archive(archive, LAYERS, repo_tag="test/app:1")
    oci_src = _src(tmp_path)
    a = convert(f"docker-archive:{archive}", f"oci:{tmp_path / 'dst'}:from-archive", OPTS)
    b = convert(f"docker-archive:{archive}:test/app:1", f"oci:{tmp_path / 'dst'}:tagged", OPTS)
    c = convert(oci_src, f"oci:{tmp_path / 'dst'}:from-oci", OPTS)
    assert a.manifest.digest == b.manifest.digest
    assert [d.digest for d in a.manifest.layers] == [d.digest for d in c.manifest.layers]
    assert oci.ANNOTATION_RAFS_SOURCE_DIGEST not in a.manifest.annotations
    rafs_image.check(rafs_image.open_local_image(f"oci:{tmp_path / 'dst'}:from-archive"))
    with pytest.raises(ImageError, match="no image tagged"):
        convert(f"docker-archive:{archive}:other:1", f"oci:{tmp_path / 'dst'}:x", OPTS)


def test_failed_convert_into_new_target_leaves_nothing(tmp_path: Path) -> None:
    src = _src(tmp_path, [[file_entry("ok", os.urandom(100_000))], [file_entry("../evil", b"")]])
    target = tmp_path / "dst"
    with pytest.raises(UnsafePathError):
        convert(src, f"oci:{target}:x", OPTS)
    assert not target.exists()


def test_failed_convert_into_existing_layout_changes_nothing(tmp_path: Path) -> None:
    src_ok = _src(tmp_path)
    target = tmp_path / "dst"
    convert(src_ok, f"oci:{target}:good", OPTS)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    index_before = (target / "index.json").read_bytes()

    build_oci_image(tmp_path / "bad", "v1", [[file_entry("new", os.urandom(200_000))],
                                             [Entry("x", "hardlink", linkname="missing")]])
    with pytest.raises(ConvertError, match="does not exist"):
        convert(f"oci:{tmp_path / 'bad'}:v1", f"oci:{target}:good", OPTS)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert (target / "index.json").read_bytes() == index_before


def test_corrupt_source_layer_is_a_digest_error_and_leaves_nothing(tmp_path: Path) -> None:
    src = _src(tmp_path)
    layout = OCILayout(tmp_path / "src")
    layer = layout.resolve("v1").layers[1]
    path = layout.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(LayerDigestError, match="layer 2"):
        convert(src, f"oci:{tmp_path / 'dst'}:x", OPTS)
    assert not (tmp_path / "dst").exists()


def test_converting_a_rafs_image_is_refused(tmp_path: Path) -> None:
    src = _src(tmp_path)
    convert(src, f"oci:{tmp_path / 'dst'}:r", OPTS)
    with pytest.raises(ConvertError, match="already a RAFS image"):
        convert(f"oci:{tmp_path / 'dst'}:r", f"oci:{tmp_path / 'dst2'}:r", OPTS)


def test_target_that_is_not_a_layout_is_refused(tmp_path: Path) -> None:
    src = _src(tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("mine")
    with pytest.raises(ImageError, match="not an OCI image layout"):
        convert(src, f"oci:{junk}:x", OPTS)
    assert os.listdir(junk) == ["file"]


def test_default_tag_is_latest(tmp_path: Path) -> None:
    src = _src(tmp_path)
    result = convert(src, f"oci:{tmp_path / 'dst'}", OPTS)
    assert OCILayout(tmp_path / "dst").tags() == ["latest"]
    assert result.target.tag == "latest"


def test_source_layer_order_and_compression_mix(tmp_path: Path) -> None:
    src = _src(tmp_path, LAYERS, compression=["zstd", "none", "gzip"])
    convert(src, f"oci:{tmp_path / 'dst'}:x", OPTS)
    rafs_image.check(rafs_image.open_local_image(f"oci:{tmp_path / 'dst'}:x"))


def test_empty_image(tmp_path: Path) -> None:
    src = _src(tmp_path, [[dir_entry("empty")]])
    result = convert(src, f"oci:{tmp_path / 'dst'}:x", OPTS)
    assert [d.media_type for d in result.manifest.layers] == [oci.MEDIA_TYPE_RAFS_BOOTSTRAP]
    assert b"/empty" in _files(f"oci:{tmp_path / 'dst'}:x")


def test_prefetch_list_reaches_the_bootstrap(tmp_path: Path) -> None:
    src = _src(tmp_path)
    convert(src, f"oci:{tmp_path / 'dst'}:x", ConvertOptions(
        chunk_size=64 << 10, progress=False, prefetch=[b"/bin/busybox", b"etc/hostname"]))
    boot = Bootstrap.from_bytes(rafs_image.open_local_image(f"oci:{tmp_path / 'dst'}:x").bootstrap)
    assert len(boot.prefetch) == 2


# -- the command line ---------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_converts_and_prints_the_reference(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = _src(tmp_path)
    args = _parse(["convert", src, f"oci:{tmp_path / 'dst'}:cli", "--chunk-size", "64K",
                   "--level", "5", "-j", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    digest = OCILayout(tmp_path / "dst").resolve("cli").digest
    assert out.out.strip() == f"oci:{tmp_path / 'dst'}:cli@{digest}"
    assert out.err == ""  # quiet when stderr is not a terminal


@pytest.mark.parametrize("size", ["3000", "32M", "12K"])
def test_cli_rejects_bad_chunk_sizes(tmp_path: Path, size: str) -> None:
    args = _parse(["convert", "oci:x:y", f"oci:{tmp_path}/d:z", "--chunk-size", size])
    with pytest.raises(OptionError):
        args.func(args)
    assert not (tmp_path / "d").exists()


def test_cli_size_parser() -> None:
    assert sizes.size_arg("4096") == 4096
    assert sizes.size_arg("64K") == 64 << 10
    assert sizes.size_arg("1MiB") == 1 << 20
    with pytest.raises(argparse.ArgumentTypeError):
        sizes.size_arg("lots")


def test_progress_is_drawn_only_when_enabled() -> None:
    from converter.progress import Progress

    out = io.StringIO()
    p = Progress(1000, enabled=True, stream=out)
    p.update(500)
    p.close()
    assert "(50%)" in out.getvalue()
    quiet = io.StringIO()  # a StringIO is not a terminal: quiet by default
    q = Progress(1000, stream=quiet)
    q.update(500)
    q.close()
    assert quiet.getvalue() == ""


def test_prefetch_files_lead_their_blobs(tmp_path: Path) -> None:
    src = _src(tmp_path)
    dst = f"oci:{tmp_path / 'dst'}:x"
    convert(src, dst, ConvertOptions(chunk_size=64 << 10, progress=False,
                                     prefetch=[b"/etc/text", b"/bin"]))
    img = rafs_image.open_local_image(dst)
    rafs_image.check(img)
    boot = Bootstrap.from_bytes(img.bootstrap)
    first, ends = {}, {}
    for path, ino in boot.walk():
        if stat.S_ISREG(ino.mode) and ino.size:
            chunks = [boot.chunk(r) for r in boot.file_chunks(ino) if r is not None]
            first[path] = (chunks[0].blob_index, chunks[0].compressed_offset)
            ends[path] = max(c.compressed_offset + c.compressed_size for c in chunks)
    assert first[b"/etc/text"] == (0, 0)  # rank 0 leads blob 0
    assert first[b"/bin/busybox"] == (0, ends[b"/etc/text"])  # rank 1 right after it
    assert first[b"/big"][1] > first[b"/bin/busybox"][1]


def _write_archive(path: Path, members: list[tuple[str, bytes | str]]) -> None:
    """A tar of (name, data) files, or (name, "->target") symlinks."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("->")
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def test_docker_25_archive_with_blobs_layout(tmp_path: Path) -> None:
    from tests.helpers.ocibuild import layer_tar

    tars = [layer_tar(layer) for layer in LAYERS]
    digests = [oci.sha256_digest(t) for t in tars]
    config = _config(digests)
    cfg = oci.sha256_digest(config)
    manifest = [{"Config": f"blobs/sha256/{cfg[7:]}", "RepoTags": ["new:1"],
                 "Layers": [f"blobs/sha256/{d[7:]}" for d in digests]}]
    members: list[tuple[str, bytes | str]] = [(f"blobs/sha256/{cfg[7:]}", config)]
    members += [(f"blobs/sha256/{d[7:]}", t) for d, t in zip(digests, tars, strict=True)]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    _write_archive(tmp_path / "a.tar", members)
    convert(f"docker-archive:{tmp_path / 'a.tar'}", f"oci:{tmp_path / 'dst'}:x", OPTS)
    rafs_image.check(rafs_image.open_local_image(f"oci:{tmp_path / 'dst'}:x"))

    # A layer whose bytes do not match the digest in its name is refused.
    members[1] = (members[1][0], tars[1])
    _write_archive(tmp_path / "b.tar", members)
    with pytest.raises(LayerDigestError):
        convert(f"docker-archive:{tmp_path / 'b.tar'}", f"oci:{tmp_path / 'dst2'}:x", OPTS)
    assert not (tmp_path / "dst2").exists()


def test_docker_archive_layer_symlinks_are_followed(tmp_path: Path) -> None:
    from tests.helpers.ocibuild import layer_tar

    same = layer_tar([file_entry("a", b"a")])
    other = layer_tar([file_entry("b", b"b")])
    diff_ids = [oci.sha256_digest(t) for t in (same, other, same)]
    config = _config(diff_ids)
    manifest = [{"Config": "c.json", "RepoTags": [], "Layers": [
        "l1/layer.tar", "l2/layer.tar", "l3/layer.tar"]}]
    _write_archive(tmp_path / "a.tar", [
        ("c.json", config), ("l1/layer.tar", same), ("l2/layer.tar", other),
        ("l3/layer.tar", "->../l1/layer.tar"), ("manifest.json", json.dumps(manifest).encode())])
    result = convert(f"docker-archive:{tmp_path / 'a.tar'}", f"oci:{tmp_path / 'dst'}:x", OPTS)
    assert len(result.blobs) == 2  # the repeated layer adds no data


def test_docker_archive_without_manifest_is_an_image_error(tmp_path: Path) -> None:
    _write_archive(tmp_path / "a.tar", [("x", b"y")])
    with pytest.raises(ImageError, match=r"manifest\.json"):
        convert(f"docker-archive:{tmp_path / 'a.tar'}", f"oci:{tmp_path / 'dst'}:x", OPTS)
    with pytest.raises(ImageError, match="no such file"):
        convert(f"docker-archive:{tmp_path / 'nope.tar'}", f"oci:{tmp_path / 'dst'}:x", OPTS)


def test_chunk_dict_reuses_an_earlier_images_blobs(tmp_path: Path) -> None:
    base = f"oci:{tmp_path / 'base'}:rafs"
    convert(_src(tmp_path), base, OPTS)
    base_img = rafs_image.open_local_image(base)
    base_blobs = [d.digest for d in base_img.manifest.layers[:-1]]

    newer = [*LAYERS[:2], [file_entry("new", os.urandom(100_000))]]
    build_oci_image(tmp_path / "src2", "v2", newer)
    dst = f"oci:{tmp_path / 'dst'}:rafs"
    plain = convert(f"oci:{tmp_path / 'src2'}:v2", f"oci:{tmp_path / 'plain'}:rafs", OPTS)
    deduped = convert(f"oci:{tmp_path / 'src2'}:v2", dst,
                      ConvertOptions(chunk_size=64 << 10, progress=False, chunk_dict=base))

    img = rafs_image.open_local_image(dst)
    layers = [d.digest for d in img.manifest.layers[:-1]]
    assert layers[:2] == base_blobs  # every chunk of the first two layers is reused
    assert len(layers) == 3 and layers[2] not in base_blobs  # only /new is stored
    new_blob = img.manifest.layers[2]
    assert new_blob.size < 110_000
    assert rafs_image.check(img) == deduped.chunks  # every digest verified
    assert _files(dst).keys() == _files(str(plain.target)).keys()
    config = json.loads(img.layout.read_blob(img.manifest.config.digest))
    assert config["rootfs"]["diff_ids"][:2] == base_blobs


def test_chunk_dict_blobs_no_file_uses_are_left_out(tmp_path: Path) -> None:
    base = f"oci:{tmp_path / 'base'}:rafs"
    convert(_src(tmp_path), base, OPTS)
    build_oci_image(tmp_path / "src2", "v2", [[file_entry("only", os.urandom(50_000))]])
    dst = f"oci:{tmp_path / 'dst'}:rafs"
    convert(f"oci:{tmp_path / 'src2'}:v2", dst,
            ConvertOptions(chunk_size=64 << 10, progress=False, chunk_dict=base))
    img = rafs_image.open_local_image(dst)
    assert len(img.manifest.layers) == 2
    assert rafs_image.check(img) > 0


def test_chunk_dict_with_another_chunk_size_is_refused(tmp_path: Path) -> None:
    base = f"oci:{tmp_path / 'base'}:rafs"
    convert(_src(tmp_path), base, OPTS)
    with pytest.raises(OptionError, match="--chunk-size 65536"):
        convert(_src(tmp_path), f"oci:{tmp_path / 'dst'}:x",
                ConvertOptions(chunk_size=128 << 10, progress=False, chunk_dict=base))
    assert not (tmp_path / "dst").exists()
