"""Bad input through the CLI: one clear line, a non-zero exit, no traceback, nothing left.

Each case is a real OCI layout whose one layer is broken in a particular way;
`rafs convert` must refuse it and leave no target behind. Broken RAFS images
(garbage bootstrap) are refused by `rafs inspect` and `rafs check` the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from rafs.oci import (
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    MEDIA_TYPE_RAFS_BOOTSTRAP,
    Descriptor,
    OCILayout,
)
from tests.helpers.mounts import rafs_cmd
from tests.helpers.ocibuild import build_oci_image, build_oci_image_of_tars, file_entry
from tests.helpers.procs import assert_clean_error, run


def tar_of(*members: tuple[str, str, bytes | str]) -> bytes:
    """An uncompressed tar of (type, name, data-or-linkname) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
                tar.addfile(info)
    return buf.getvalue()


def gnu_tar_with(**fields: int) -> bytes:
    """A GNU tar of one entry whose numeric fields are set as given (base-256 fields hold
    negative and huge numbers): a char device when device numbers are given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("odd")
        if "devmajor" in fields or "devminor" in fields:
            info.type = tarfile.CHRTYPE
        for name, value in fields.items():
            setattr(info, name, value)
        tar.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


GOOD = tar_of(("file", "etc/hostname", b"rafs\n"), ("file", "big", os.urandom(100_000)))

LAYERS: dict[str, bytes] = {
    "truncated tar": GOOD[: len(GOOD) // 2],
    "garbage tar": os.urandom(20_000),
    "dot-dot name": tar_of(("file", "../../etc/evil", b"x")),
    "absolute name": tar_of(("file", "/etc/evil", b"x")),
    "hardlink to a missing target": tar_of(("file", "a", b"x"), ("link", "b", "missing")),
    "uid -1": gnu_tar_with(uid=-1),  # found by bench.fuzz: a struct.error from the builder
    "gid 4294967296": gnu_tar_with(gid=2**32),
    "device major 4096": gnu_tar_with(devmajor=4096, devminor=1),
    "device minor -1": gnu_tar_with(devmajor=1, devminor=-1),
}


def layout_with_layer(tmp_path: Path, data: bytes) -> Path:
    build_oci_image_of_tars(tmp_path / "src", "v1", [data])
    return tmp_path / "src"


def assert_refused(tmp_path: Path, src: str) -> str:
    target = tmp_path / "out"
    res = run(rafs_cmd("convert", src, f"oci:{target}:v1", "--no-progress"), timeout=120)
    message = assert_clean_error(res)
    assert not target.exists(), "a failed convert left its target behind"
    return message


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_broken_layers_are_refused_cleanly(tmp_path, case):
    src = layout_with_layer(tmp_path, LAYERS[case])
    message = assert_refused(tmp_path, f"oci:{src}:v1")
    if case.startswith(("uid", "gid", "device")):  # the case's name is the field and value
        assert f"{case} is not in 0.." in message, message


def _manifest_path(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    return layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]


def test_a_layer_that_differs_from_its_digest_is_refused(tmp_path):
    src = layout_with_layer(tmp_path, GOOD)
    manifest = json.loads(_manifest_path(src).read_text())
    blob = src / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF  # inside the first file's data: still a valid tar
    blob.write_bytes(bytes(data))
    assert "descriptor says" in assert_refused(tmp_path, f"oci:{src}:v1")


def test_an_unknown_layer_media_type_is_refused(tmp_path):
    src = layout_with_layer(tmp_path, GOOD)
    path = _manifest_path(src)
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["mediaType"] = "application/vnd.example.mystery"
    raw = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (src / "blobs" / "sha256" / digest).write_bytes(raw)
    index = json.loads((src / "index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(raw))
    (src / "index.json").write_text(json.dumps(index))
    assert "media type" in assert_refused(tmp_path, f"oci:{src}:v1")


def test_a_missing_source_is_refused(tmp_path):
    assert_refused(tmp_path, f"oci:{tmp_path / 'nothing'}:v1")
    assert_refused(tmp_path, f"docker-archive:{tmp_path / 'nothing.tar'}")


@pytest.fixture
def garbage_bootstrap_image(tmp_path) -> str:
    """A correctly digested RAFS image whose bootstrap is junk."""
    build_oci_image(tmp_path / "src", "v1", [[file_entry("f", b"data")]])
    ref = f"oci:{tmp_path / 'rafs'}:v1"
    assert run(rafs_cmd("convert", f"oci:{tmp_path / 'src'}:v1", ref, "--no-progress"),
               timeout=120).returncode == 0
    layout = OCILayout(tmp_path / "rafs")
    manifest = json.loads(layout.read_blob(layout.resolve("v1").digest))
    junk = b"RAFSBOOT" + os.urandom(8000)
    desc = layout.put_blob_bytes(
        zstandard.ZstdCompressor().compress(junk), MEDIA_TYPE_RAFS_BOOTSTRAP,
        {ANNOTATION_RAFS_BOOTSTRAP_DIGEST: "sha256:" + hashlib.sha256(junk).hexdigest()})
    assert isinstance(desc, Descriptor)
    manifest["layers"][-1] = desc.to_json()
    layout.put_manifest(manifest, "junk")
    return f"oci:{tmp_path / 'rafs'}:junk"


@pytest.mark.parametrize("command", ["inspect", "check"])
def test_a_garbage_bootstrap_is_a_format_error(garbage_bootstrap_image, command):
    message = assert_clean_error(run(rafs_cmd(command, garbage_bootstrap_image), timeout=60))
    assert "bad bootstrap" in message


def test_check_finds_a_flipped_byte_in_a_blob(tmp_path):
    build_oci_image(tmp_path / "src", "v1", [[file_entry("f", os.urandom(50_000))]])
    ref = f"oci:{tmp_path / 'rafs'}:v1"
    assert run(rafs_cmd("convert", f"oci:{tmp_path / 'src'}:v1", ref, "--no-progress"),
               timeout=120).returncode == 0
    layout = OCILayout(tmp_path / "rafs")
    blob_desc = layout.resolve("v1").layers[0]
    path = layout.blob_path(blob_desc.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert "sha256 mismatch" in assert_clean_error(run(rafs_cmd("check", ref), timeout=60))
