"""Give every entry of an image layer its parent directory entries.

Owns: ``add_parent_dirs`` (an OCI image layout -> a new layout whose layers have an
entry for each parent directory of each of their entries) and the tar rewrite
behind it.

Why: umoci writes a layer with only the entries that changed, so a file added
under an unchanged ``/usr/lib`` comes without ``usr`` and ``usr/lib`` entries. That
is a valid layer (the lower layer has the directories), but ``ctr-remote image
optimize`` sorts a layer's entries by access and fails on it (``failed to sort tar
entries: file: "usr": not found``). The missing entries are copies of the
directory as the layers below left it (mode, owner, times, xattrs), so the
image's merged tree is unchanged; only layers that lacked entries are rewritten
(gzip, level 6), the others are copied as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import isal.igzip

__all__ = ["LayerFix", "add_parent_dirs"]

MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class LayerFix:
    """What happened to one layer: the entries added (0: copied unchanged)."""

    digest: str
    added: int


def add_parent_dirs(src: Path, tag: str, dst: Path, dst_tag: str | None = None) -> list[LayerFix]:
    """Write ``dst`` (a new OCI layout, tag ``dst_tag`` or ``tag``): the image
    ``src:tag`` with the missing parent directory entries added to its layers."""
    index = json.loads((src / "index.json").read_text())
    desc = next((m for m in index["manifests"]
                 if m.get("annotations", {}).get(REF_NAME) == tag), None)
    if desc is None:
        raise ValueError(f"{src}: no tag {tag!r}")
    manifest = json.loads(_blob(src, desc["digest"]).read_text())
    config = json.loads(_blob(src, manifest["config"]["digest"]).read_text())
    (dst / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    dirs: dict[str, tarfile.TarInfo] = {}  # directory -> its entry, as the layers so far left it
    fixes, layers, diff_ids = [], [], []
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        if layer["mediaType"] not in (MEDIA_GZIP, MEDIA_DOCKER_GZIP):
            raise ValueError(f"{layer['digest']}: {layer['mediaType']} is not a gzip layer")
        tmp = dst / "blobs" / "sha256" / ".layer.tmp"
        with open(_blob(src, layer["digest"]), "rb") as raw, open(tmp, "wb") as out:
            added, new_diff_id, digest = _rewrite(raw, out, dirs)
        if added:
            os.rename(tmp, _blob(dst, digest))
            layers.append({**layer, "mediaType": MEDIA_GZIP, "digest": digest,
                           "size": _blob(dst, digest).stat().st_size})
            diff_ids.append(new_diff_id)
        else:
            tmp.unlink()
            shutil.copyfile(_blob(src, layer["digest"]), _blob(dst, layer["digest"]))
            layers.append(layer)
            diff_ids.append(diff_id)
        fixes.append(LayerFix(layer["digest"], added))

    config["rootfs"]["diff_ids"] = diff_ids
    config_desc = _put_json(dst, config, manifest["config"]["mediaType"])
    manifest = {**manifest, "config": config_desc, "layers": layers}
    manifest_desc = _put_json(dst, manifest, desc["mediaType"])
    manifest_desc["annotations"] = {REF_NAME: dst_tag or tag}
    (dst / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                "manifests": [manifest_desc]}))
    return fixes


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def _put_json(layout: Path, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = json.dumps(doc, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _norm(name: str) -> str:
    """A tar member name as a relative path without ``./`` or trailing ``/``."""
    p = PurePosixPath("/", name)
    return str(p.relative_to("/")) if p != PurePosixPath("/") else ""


def _parents(path: str) -> Iterator[str]:
    """``a``, ``a/b`` for ``a/b/c``: the parents, outermost first."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


class _HashingWriter:
    """A write-only file that hashes what it passes on (and counts it)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


class _GzipWriter:
    """Deterministic gzip (mtime 0, level 6) onto ``out``; hashes the tar it is given."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.tar_sha = hashlib.sha256()
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip header, mtime 0

    def write(self, data: bytes) -> int:
        self.tar_sha.update(data)
        self.out.write(self._z.compress(data))
        return len(data)

    def close(self) -> None:
        self.out.write(self._z.flush())


def _dir_entry(name: str, like: tarfile.TarInfo | None, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    if like is None:  # no layer below has it: root-owned 0755, as umoci would write it
        info.mode, info.mtime = 0o755, mtime
        return info
    info.mode, info.uid, info.gid = like.mode, like.uid, like.gid
    info.uname, info.gname, info.mtime = like.uname, like.gname, like.mtime
    info.pax_headers = {k: v for k, v in like.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return info


def _forget(dirs: dict[str, tarfile.TarInfo], path: str, itself: bool) -> None:
    prefix = path + "/" if path else ""
    for d in [d for d in dirs if d.startswith(prefix) or (itself and d == path)]:
        del dirs[d]


def _rewrite(raw: IO[bytes], out: IO[bytes], dirs: dict[str, tarfile.TarInfo],
             ) -> tuple[int, str, str]:
    """Copy the gzip layer ``raw`` to ``out`` with the missing parent entries added;
    update ``dirs`` to the state after this layer. Returns (entries added, new
    diff_id, new blob digest)."""
    hashed = _HashingWriter(out)
    gz = _GzipWriter(hashed)
    seen: set[str] = set()  # directories this layer has an entry for
    below = dict(dirs)  # the lower layers' directories, for the copies
    added = 0
    with isal.igzip.open(raw, "rb") as tar_in, \
            tarfile.open(fileobj=tar_in, mode="r|") as src, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as dst:  # type: ignore[arg-type]
        for member in src:
            path = _norm(member.name)
            for parent in _parents(path):
                if parent not in seen:
                    dst.addfile(_dir_entry(parent + "/", below.get(parent), member.mtime))
                    seen.add(parent)
                    added += 1
            parent, _, base = path.rpartition("/")
            if base == OPAQUE:
                _forget(dirs, parent, itself=False)
            elif base.startswith(WHITEOUT):
                _forget(dirs, f"{parent}/{base[len(WHITEOUT):]}".lstrip("/"), itself=True)
            elif member.isdir():
                seen.add(path)
                dirs[path] = member
            elif path in dirs:  # a directory replaced by a file
                _forget(dirs, path, itself=True)
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    gz.close()
    return added, "sha256:" + gz.tar_sha.hexdigest(), "sha256:" + hashed.sha.hexdigest()
