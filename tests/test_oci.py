"""rafs.oci: references, descriptors, manifests and the OCI image layout on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rafs import oci
from rafs.errors import DigestError, ImageError, MediaTypeError
from rafs.oci import Descriptor, ImageRef, OCILayout, parse_image_ref
from tests.helpers.ocibuild import build_oci_image, file_entry


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- references ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "ref"), [
    ("oci:/tmp/img", ImageRef("oci", "/tmp/img", None)),
    ("oci:/tmp/img:v1", ImageRef("oci", "/tmp/img", "v1")),
    ("oci:rel/dir:docker.io/library/alpine:3", ImageRef("oci", "rel/dir",
                                                        "docker.io/library/alpine:3")),
    ("docker-archive:/x/a.tar", ImageRef("docker-archive", "/x/a.tar", None)),
    ("docker-archive:a.tar:busybox:latest", ImageRef("docker-archive", "a.tar",
                                                     "busybox:latest")),
    ("docker://localhost:5000/app:v2", ImageRef("docker", "localhost:5000/app", "v2")),
    ("docker://alpine", ImageRef("docker", "docker.io/library/alpine", "latest")),
    ("docker://user/app:1.0", ImageRef("docker", "docker.io/user/app", "1.0")),
    ("docker://ghcr.io/o/r/app", ImageRef("docker", "ghcr.io/o/r/app", "latest")),
    ("docker://ghcr.io/o/app@sha256:" + "a" * 64,
     ImageRef("docker", "ghcr.io/o/app", None, "sha256:" + "a" * 64)),
])
def test_parse_image_ref(text: str, ref: ImageRef) -> None:
    assert parse_image_ref(text) == ref


@pytest.mark.parametrize("text", ["", "/tmp/img", "oci:", "dir:/x", "docker://Host/UPPER",
                                  "docker://x/y@sha256:short"])
def test_bad_image_refs_are_rejected(text: str) -> None:
    with pytest.raises(ImageError):
        parse_image_ref(text)


def test_image_ref_round_trips_through_str() -> None:
    for text in ("oci:/a:b", "docker-archive:/x.tar", "docker://localhost:5000/app:v2"):
        assert str(parse_image_ref(text)) == text


# -- digests and descriptors --------------------------------------------------


@pytest.mark.parametrize("digest", ["sha256:" + "A" * 64, "sha256:../../etc/passwd",
                                    "sha512:" + "a" * 128, "sha256:" + "a" * 63, None, 5])
def test_malformed_digests_are_rejected(digest: object) -> None:
    with pytest.raises(DigestError):
        oci.check_digest(digest)


def test_blob_path_refuses_traversal(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "l")
    with pytest.raises(DigestError):
        layout.blob_path("sha256:../../../../etc/passwd")


def test_descriptor_json_round_trip() -> None:
    d = Descriptor("application/x", "sha256:" + "b" * 64, 12, {"k": "v"},
                   platform={"os": "linux", "architecture": "amd64"})
    assert Descriptor.from_json(json.loads(json.dumps(d.to_json()))) == d
    assert "annotations" not in Descriptor("a", "sha256:" + "b" * 64, 1).to_json()


@pytest.mark.parametrize("bad", [
    {"digest": "sha256:" + "b" * 64, "size": 1},
    {"mediaType": "a", "digest": "sha256:" + "b" * 64, "size": -1},
    {"mediaType": "a", "digest": "sha256:" + "b" * 64, "size": True},
    {"mediaType": "a", "digest": "md5:abc", "size": 1},
    {"mediaType": "a", "digest": "sha256:" + "b" * 64, "size": 1, "annotations": {"k": 1}},
    [],
])
def test_bad_descriptors_are_rejected(bad: object) -> None:
    with pytest.raises((ImageError, DigestError)):
        Descriptor.from_json(bad)


# -- layouts ------------------------------------------------------------------


def test_create_makes_a_layout_that_opens(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"}
    assert layout.index_entries() == []
    OCILayout(tmp_path / "new")


def test_opening_a_non_layout_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI image layout"):
        OCILayout(tmp_path)


def test_read_blob_verifies_the_digest(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path)
    desc = layout.put_blob_bytes(b"hello", "text/plain")
    assert layout.read_blob(desc.digest) == b"hello"
    layout.blob_path(desc.digest).write_bytes(b"jello")
    with pytest.raises(DigestError):
        layout.read_blob(desc.digest)
    with pytest.raises(ImageError, match="missing"):
        layout.read_blob(_sha(b"absent"))
    big = layout.put_blob_bytes(b"x" * 100, "text/plain")
    with pytest.raises(ImageError, match="more than"):
        layout.read_blob(big.digest, max_size=10)


def test_put_blob_file_moves_into_place(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "l")
    tmp = tmp_path / "l" / "tmpfile"
    tmp.write_bytes(b"data")
    desc = layout.put_blob_file(tmp, _sha(b"data"), 4, "application/x", {"a": "b"})
    assert not tmp.exists()
    assert layout.read_blob(desc.digest) == b"data"
    assert desc.annotations == {"a": "b"}


def _manifest(layout: OCILayout, body: bytes = b"layer") -> dict[str, object]:
    config = layout.put_blob_bytes(b"{}", oci.MEDIA_TYPE_OCI_CONFIG)
    layer = layout.put_blob_bytes(body, oci.MEDIA_TYPE_OCI_LAYER)
    return {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
            "config": config.to_json(), "layers": [layer.to_json()]}


def test_put_manifest_tags_and_replaces_the_same_tag(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path)
    m1 = layout.put_manifest(_manifest(layout, b"one"), "v1")
    m2 = layout.put_manifest(_manifest(layout, b"two"), "v2")
    m3 = layout.put_manifest(_manifest(layout, b"three"), "v1")
    assert sorted(layout.tags()) == ["v1", "v2"]
    assert layout.resolve("v1").digest == m3.digest != m1.digest
    assert layout.resolve("v2").digest == m2.digest
    raw = (tmp_path / "index.json").read_bytes()
    assert raw == oci.canonical_json(json.loads(raw))  # canonical JSON on disk


def test_resolve_without_tag_needs_exactly_one_image(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path)
    m = layout.put_manifest(_manifest(layout), "only")
    assert layout.resolve(None).digest == m.digest
    layout.put_manifest(_manifest(layout, b"2"), "second")
    with pytest.raises(ImageError, match="holds 2 images"):
        layout.resolve(None)
    with pytest.raises(ImageError, match="no image tagged"):
        layout.resolve("nope")


def test_resolve_follows_an_index_to_the_host_platform(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path)
    host_os, host_arch = oci.host_platform()
    other = layout.put_blob_bytes(oci.canonical_json(_manifest(layout, b"other")),
                                  oci.MEDIA_TYPE_OCI_MANIFEST)
    mine = layout.put_blob_bytes(oci.canonical_json(_manifest(layout, b"mine")),
                                 oci.MEDIA_TYPE_OCI_MANIFEST)
    other.platform = {"os": "linux", "architecture": "mips64le"}
    mine.platform = {"os": host_os, "architecture": host_arch}
    index = layout.put_blob_bytes(oci.canonical_json({
        "schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
        "manifests": [other.to_json(), mine.to_json()]}), oci.MEDIA_TYPE_OCI_INDEX)
    index.annotations = {oci.ANNOTATION_REF_NAME: "multi"}
    (tmp_path / "index.json").write_bytes(oci.canonical_json({
        "schemaVersion": 2, "manifests": [index.to_json()]}))
    assert layout.resolve("multi").digest == mine.digest


def test_resolve_rejects_unknown_media_types(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path)
    blob = layout.put_blob_bytes(b"{}", "application/x-weird")
    blob.annotations = {oci.ANNOTATION_REF_NAME: "w"}
    (tmp_path / "index.json").write_bytes(oci.canonical_json({
        "schemaVersion": 2, "manifests": [blob.to_json()]}))
    with pytest.raises(MediaTypeError):
        layout.resolve("w")


def test_reads_layouts_written_by_the_test_image_builder(tmp_path: Path) -> None:
    digest = build_oci_image(tmp_path, "t", [[file_entry("a", b"a")]])
    m = OCILayout(tmp_path).resolve("t")
    assert m.digest == digest and len(m.layers) == 1
    assert not oci.is_rafs(m)
    with pytest.raises(ImageError, match="not a RAFS image"):
        oci.bootstrap_descriptor(m)


def test_is_rafs_and_bootstrap_descriptor() -> None:
    boot = Descriptor(oci.MEDIA_TYPE_RAFS_BOOTSTRAP, "sha256:" + "c" * 64, 10)
    blob = Descriptor(oci.MEDIA_TYPE_RAFS_BLOB, "sha256:" + "d" * 64, 10)
    cfg = Descriptor(oci.MEDIA_TYPE_OCI_CONFIG, "sha256:" + "e" * 64, 2)
    m = oci.Manifest(oci.MEDIA_TYPE_OCI_MANIFEST, cfg, [blob, boot],
                     {oci.ANNOTATION_RAFS_VERSION: "1"}, b"", "sha256:" + "f" * 64)
    assert oci.is_rafs(m)
    assert oci.bootstrap_descriptor(m) is boot


def test_parse_manifest_rejects_indexes_and_old_schemas() -> None:
    with pytest.raises(MediaTypeError):
        oci.parse_manifest(json.dumps({"schemaVersion": 2,
                                       "mediaType": oci.MEDIA_TYPE_OCI_INDEX}).encode())
    with pytest.raises(ImageError, match="schemaVersion"):
        oci.parse_manifest(json.dumps({"schemaVersion": 1, "layers": []}).encode())
    with pytest.raises(ImageError, match="JSON"):
        oci.parse_manifest(b"{nope")
