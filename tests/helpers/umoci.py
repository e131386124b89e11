"""The reference unpacker: an OCI layout tag unpacked to a rootfs by umoci.

Owns: calling ``umoci raw unpack`` (as root, so ownership, device nodes and
xattrs are kept), turning its failure into an assertion with umoci's output, and
working around umoci 0.4's lack of zstd: zstd layers are re-encoded as gzip in a
throw-away copy of the layout first (the uncompressed tar, checked against the
config's ``diff_ids``, is unchanged, so what umoci unpacks is the same image).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import zstandard

__all__ = ["umoci_unpack"]

_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_REF_NAME = "org.opencontainers.image.ref.name"


def umoci_unpack(layout_dir: Path, tag: str, dest: Path, timeout: float = 600) -> Path:
    """Unpack ``layout_dir:tag`` into ``dest`` (must not exist yet); returns the rootfs.

    Layers are applied in order and whiteouts consumed, as a container runtime
    would see the image.
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    layout_dir = Path(layout_dir)
    manifest = _manifest(layout_dir, tag)
    if not any(layer["mediaType"] == _ZSTD for layer in manifest["layers"]):
        _umoci_raw_unpack(layout_dir, tag, dest, timeout)
        return dest
    with tempfile.TemporaryDirectory(prefix="umoci-gzip-") as tmp:
        shadow = Path(tmp) / "layout"
        _gzip_shadow_layout(layout_dir, tag, manifest, shadow)
        _umoci_raw_unpack(shadow, tag, dest, timeout)
    return dest


def _umoci_raw_unpack(layout_dir: Path, tag: str, dest: Path, timeout: float) -> None:
    proc = subprocess.run(
        ["umoci", "raw", "unpack", "--image", f"{layout_dir}:{tag}", str(dest)],
        capture_output=True,
        text=True,
        errors="backslashreplace",  # umoci names non-UTF-8 paths as they are
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"umoci raw unpack {layout_dir}:{tag} failed ({proc.returncode}):\n{proc.stderr}"
        )


def _blob_path(layout_dir: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout_dir / "blobs" / algo / hexdigest


def _manifest(layout_dir: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout_dir / "index.json").read_text())
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get(_REF_NAME) == tag:
            return json.loads(_blob_path(layout_dir, desc["digest"]).read_bytes())
    raise AssertionError(f"{layout_dir} has no tag {tag!r}")


def _gzip_shadow_layout(src: Path, tag: str, manifest: dict[str, Any], dst: Path) -> None:
    """A layout at ``dst`` holding ``tag`` with every zstd layer re-encoded as gzip."""
    (dst / "blobs" / "sha256").mkdir(parents=True)
    config = json.loads(_blob_path(src, manifest["config"]["digest"]).read_bytes())
    diff_ids = config["rootfs"]["diff_ids"]
    _link_blob(src, dst, manifest["config"]["digest"])
    layers = []
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        if layer["mediaType"] != _ZSTD:
            _link_blob(src, dst, layer["digest"])
            layers.append(layer)
            continue
        layers.append(_recompress(_blob_path(src, layer["digest"]), diff_id, dst))
    new_manifest = {**manifest, "layers": layers}
    desc = _write_blob(dst, json.dumps(new_manifest).encode(), manifest.get("mediaType", ""))
    desc["annotations"] = {_REF_NAME: tag}
    (dst / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


def _recompress(zstd_blob: Path, diff_id: str, dst: Path) -> dict[str, Any]:
    tmp = dst / "blobs" / "layer.tmp"
    raw_hash = hashlib.sha256()
    with open(zstd_blob, "rb") as src, open(tmp, "wb") as out:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
            while chunk := reader.read(1 << 20):
                raw_hash.update(chunk)
                gz.write(chunk)
    if f"sha256:{raw_hash.hexdigest()}" != diff_id:
        raise AssertionError(f"zstd layer {zstd_blob.name} does not match diff_id {diff_id}")
    data = tmp.read_bytes()
    tmp.unlink()
    return _write_blob(dst, data, _GZIP)


def _write_blob(layout_dir: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob_path(layout_dir, digest).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _link_blob(src: Path, dst: Path, digest: str) -> None:
    target = _blob_path(dst, digest)
    try:
        os.link(_blob_path(src, digest), target)
    except OSError:
        shutil.copyfile(_blob_path(src, digest), target)
