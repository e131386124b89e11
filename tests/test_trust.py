"""The trust chain, checked in one place (rafs.trust) and used by every loader:
`rafs inspect`/`check` of an OCI layout, the registry's fetch_bootstrap and the
daemon's load_bootstrap refuse the same broken chains with the same one line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import trio
import zstandard

from fused.backend import LocalBackend
from fused.daemon import load_bootstrap
from rafs import codec
from rafs.errors import DigestError, ImageError
from rafs.image import open_local_image
from rafs.model import Node
from rafs.oci import (
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_RAFS_BOOTSTRAP,
    OCILayout,
    parse_manifest,
    sha256_digest,
)
from rafs.trust import bootstrap_layer, verify_bootstrap, verify_manifest
from tests.fused_support import write_rafs_image
from tests.helpers.images import ImageParts

RAW = b"a bootstrap, as far as the trust chain cares " * 100


def _manifest(payload: bytes, *, raw_digest: str | None = None, size: int | None = None,
              media_type: str = MEDIA_TYPE_RAFS_BOOTSTRAP):
    annotations = {ANNOTATION_RAFS_BOOTSTRAP_DIGEST: raw_digest} if raw_digest else {}
    raw = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": sha256_digest(b"{}"), "size": 2},
                      "layers": [{"mediaType": media_type, "digest": sha256_digest(payload),
                                  "size": len(payload) if size is None else size,
                                  "annotations": annotations}]}).encode()
    return parse_manifest(raw)


PAYLOAD = zstandard.ZstdCompressor().compress(RAW)


def test_a_whole_chain_gives_the_uncompressed_bootstrap_and_its_digest():
    manifest = _manifest(PAYLOAD, raw_digest=sha256_digest(RAW))
    boot = verify_bootstrap(manifest, PAYLOAD, manifest_digest=manifest.digest)
    assert boot.raw == RAW and boot.digest == sha256_digest(RAW)


def test_without_the_annotation_the_layer_digest_vouches_alone():
    assert verify_bootstrap(_manifest(PAYLOAD), PAYLOAD).raw == RAW


def test_each_broken_link_is_one_clear_line():
    good = _manifest(PAYLOAD, raw_digest=sha256_digest(RAW))
    flipped = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    cases = [
        (lambda: verify_bootstrap(good, flipped), DigestError, "does not match its digest"),
        (lambda: verify_bootstrap(good, PAYLOAD + b"x"), DigestError, "does not match"),
        (lambda: verify_bootstrap(good, PAYLOAD, manifest_digest="sha256:" + "0" * 64),
         DigestError, "expected sha256:000"),
        (lambda: verify_bootstrap(_manifest(PAYLOAD, raw_digest="sha256:" + "1" * 64),
                                  PAYLOAD), DigestError, "its layer says sha256:111"),
        (lambda: verify_bootstrap(_manifest(b"junk"), b"junk"), DigestError,
         "does not decompress"),
        (lambda: verify_bootstrap(_manifest(PAYLOAD, media_type="application/x-other"),
                                  PAYLOAD), ImageError, "is not a RAFS image"),
        (lambda: bootstrap_layer(_manifest(PAYLOAD, size=codec.MAX_BOOTSTRAP + 1), "img"),
         ImageError, "img: the bootstrap layer of"),
    ]
    for call, error, text in cases:
        with pytest.raises(error, match=text) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_manifest_must_match_the_digest_that_names_it():
    raw = b'{"schemaVersion": 2}'
    assert verify_manifest(raw, None) == sha256_digest(raw)
    assert verify_manifest(raw, sha256_digest(raw)) == sha256_digest(raw)
    assert verify_manifest(raw, "sha512:abc") == sha256_digest(raw)  # not ours to check
    with pytest.raises(DigestError, match="m: the manifest is sha256:"):
        verify_manifest(raw, "sha256:" + "2" * 64, "m")


# -- every loader uses it --------------------------------------------------------------


@pytest.fixture
def tampered(tmp_path: Path) -> str:
    """An image whose bootstrap layer was changed after the manifest vouched for it."""
    parts = ImageParts(Node.directory(0o755, mtime=1), chunk_size=64 << 10)
    parts.new_blob()
    assert parts.root.children is not None
    parts.root.children[b"f"] = parts.file(os.urandom(1000), mtime=1)
    img = write_rafs_image(parts, tmp_path / "img")
    layout = OCILayout(img.layout)
    desc = layout.resolve("latest").layers[-1]
    path = layout.blob_path(desc.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return img.ref


def test_an_oci_image_with_a_tampered_bootstrap_is_refused(tampered):
    with pytest.raises(DigestError, match="does not match its digest"):
        open_local_image(tampered)


def test_the_daemon_refuses_a_tampered_bootstrap_and_caches_nothing(tampered, tmp_path):
    layout = tampered.split(":")[1]

    async def load() -> None:
        async with LocalBackend(layout, "latest") as backend:
            await load_bootstrap(backend, str(tmp_path / "cache"))

    with pytest.raises(DigestError, match=f"oci:{layout}:latest: the bootstrap layer"):
        trio.run(load)
    assert not (tmp_path / "cache" / "bootstraps").exists() or not any(
        (tmp_path / "cache" / "bootstraps").rglob("*"))


def test_the_daemon_keeps_the_verified_bootstrap_under_its_digest(tmp_path):
    parts = ImageParts(Node.directory(0o755, mtime=1), chunk_size=64 << 10)
    parts.new_blob()
    img = write_rafs_image(parts, tmp_path / "img")

    async def load() -> Path:
        async with LocalBackend(img.layout, "latest") as backend:
            return await load_bootstrap(backend, str(tmp_path / "cache"))

    path = trio.run(load)
    assert path.read_bytes() == img.bootstrap
    assert path.name == hashlib.sha256(img.bootstrap).hexdigest()
    assert trio.run(load) == path  # the second time from the cache
