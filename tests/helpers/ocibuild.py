"""Synthetic OCI images: layer tars from ``Entry`` lists, written as layouts or archives.

Owns: the ``Entry`` description of a tar member, writing layer tars with Python's
``tarfile`` (PAX format, so long names, big ids, xattrs and non-UTF-8 names all
work), compressing them (gzip, zstd, none), and writing either an OCI image
layout (``build_oci_image``) or a ``docker save`` style archive
(``build_docker_archive``).

Independent of rafs on purpose: it is the reference the converter is tested against.

Names are relative paths without a leading ``/`` (``"etc/passwd"``); a ``bytes``
name may hold any bytes (non-UTF-8 names are written raw, with
``hdrcharset=BINARY``, which is how GNU tar and Go's archive/tar read them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

__all__ = [
    "DEFAULT_MTIME",
    "MEDIA_TYPES",
    "Entry",
    "ImageConfig",
    "build_docker_archive",
    "build_oci_image",
    "build_oci_image_of_tars",
    "dir_entry",
    "file_entry",
    "layer_tar",
    "opaque_whiteout",
    "symlink_entry",
    "whiteout",
]

EntryType = Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo"]
Compression = Literal["gzip", "zstd", "none"]

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MTIME = 1_700_000_000  # 2023-11-14, a fixed point so layers are reproducible

MEDIA_TYPES: dict[str, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

_TAR_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


@dataclass
class Entry:
    """One tar member. ``mode`` is the permission bits incl. setuid/setgid/sticky.

    ``mode=None`` means 0o755 for directories, 0o777 for symlinks, 0o644 otherwise.
    ``linkname`` is the symlink target, or for a hardlink the member name it links to.
    ``xattrs`` become PAX ``SCHILY.xattr.NAME`` records; ``pax`` adds raw PAX records.
    """

    name: str | bytes
    type: EntryType = "file"
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    data: bytes = b""
    linkname: str | bytes = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    def tarinfo(self) -> tarfile.TarInfo:
        """The ``TarInfo`` for this entry (bytes names decoded with surrogateescape)."""
        if self.type not in _TAR_TYPES:
            raise ValueError(f"unknown entry type {self.type!r}")
        info = tarfile.TarInfo(_text(self.name))
        info.type = _TAR_TYPES[self.type]
        info.mode = self.mode if self.mode is not None else _DEFAULT_MODES.get(self.type, 0o644)
        info.uid, info.gid = self.uid, self.gid
        info.uname, info.gname = self.uname, self.gname
        info.mtime = self.mtime
        info.size = len(self.data) if self.type == "file" else 0
        info.linkname = _text(self.linkname)
        info.devmajor, info.devminor = self.devmajor, self.devminor
        pax = {f"SCHILY.xattr.{k}": _text(v) for k, v in self.xattrs.items()}
        pax.update(self.pax)
        info.pax_headers = pax
        return info


@dataclass
class ImageConfig:
    """The runtime part of an OCI image config (``config`` in the config blob)."""

    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    entrypoint: list[str] | None = None
    working_dir: str = "/"
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "Env": self.env,
            "Cmd": self.cmd,
            "Entrypoint": self.entrypoint,
            "WorkingDir": self.working_dir,
            "User": self.user,
            "Labels": self.labels,
        }


def file_entry(name: str | bytes, data: bytes = b"", mode: int = 0o644, **kw: object) -> Entry:
    return Entry(name, "file", mode=mode, data=data, **kw)  # type: ignore[arg-type]


def dir_entry(name: str | bytes, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(name, "dir", mode=mode, **kw)  # type: ignore[arg-type]


def symlink_entry(name: str | bytes, target: str | bytes, **kw: object) -> Entry:
    return Entry(name, "symlink", linkname=target, **kw)  # type: ignore[arg-type]


def whiteout(path: str) -> Entry:
    """An OCI whiteout: ``dir/.wh.name`` removes ``dir/name`` of lower layers."""
    head, _, base = path.rstrip("/").rpartition("/")
    return Entry(f"{head}/.wh.{base}" if head else f".wh.{base}", "file")


def opaque_whiteout(directory: str) -> Entry:
    """An opaque whiteout: hides every lower-layer entry below ``directory``."""
    directory = directory.strip("/")
    return Entry(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq", "file")


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """The uncompressed PAX tar of ``entries``, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tf:
        for entry in entries:
            info = entry.tarinfo()
            tf.addfile(info, io.BytesIO(entry.data) if entry.type == "file" else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def build_oci_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[Sequence[Entry]],
    compression: Sequence[Compression] | Compression = "gzip",
    config: ImageConfig | None = None,
) -> str:
    """Write an image with ``layers`` (bottom first) into the OCI layout at ``layout_dir``.

    ``compression`` is one codec for every layer or one per layer. The manifest is
    added to ``index.json`` under ``tag`` (an existing entry with that tag is
    replaced, others are kept). Returns the manifest digest (``sha256:...``).
    """
    return build_oci_image_of_tars(layout_dir, tag, [layer_tar(e) for e in layers],
                                   compression, config)


def build_oci_image_of_tars(
    layout_dir: Path,
    tag: str,
    tars: Sequence[bytes],
    compression: Sequence[Compression] | Compression = "none",
    config: ImageConfig | None = None,
) -> str:
    """``build_oci_image`` with layer tars given as bytes, as they are: also ones no
    ``Entry`` list can describe (truncated, garbage, hostile names)."""
    layout_dir = Path(layout_dir)
    codecs = _per_layer(compression, len(tars))
    config = config or ImageConfig()

    layer_descs, diff_ids = [], []
    for tar, codec in zip(tars, codecs, strict=True):
        diff_ids.append(_digest(tar))
        layer_descs.append(_write_blob(layout_dir, compress(tar, codec), MEDIA_TYPES[codec]))

    config_blob = _config_json(config, diff_ids)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _write_blob(layout_dir, config_blob, CONFIG_MEDIA_TYPE),
        "layers": layer_descs,
    }
    manifest_desc = _write_blob(layout_dir, _json_bytes(manifest), MANIFEST_MEDIA_TYPE)
    manifest_desc["annotations"] = {REF_NAME: tag}

    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout_dir / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag
    ] + [manifest_desc]
    index_path.write_bytes(_json_bytes(index))
    return str(manifest_desc["digest"])


def build_docker_archive(
    path: Path,
    layers: Sequence[Sequence[Entry]],
    repo_tag: str = "rafs-test:latest",
    config: ImageConfig | None = None,
) -> None:
    """Write a ``docker save`` archive: manifest.json, config json, uncompressed layer tars."""
    config = config or ImageConfig()
    tars = [layer_tar(entries) for entries in layers]
    diff_ids = [_digest(t) for t in tars]
    config_blob = _config_json(config, diff_ids)
    config_name = f"{_digest(config_blob).removeprefix('sha256:')}.json"

    members: list[tuple[str, bytes]] = [(config_name, config_blob)]
    layer_paths = []
    parent = ""
    for tar, diff_id in zip(tars, diff_ids, strict=True):
        layer_id = hashlib.sha256(f"{parent}\n{diff_id}".encode()).hexdigest()
        legacy = {"id": layer_id, **({"parent": parent} if parent else {})}
        members += [
            (f"{layer_id}/VERSION", b"1.0"),
            (f"{layer_id}/json", _json_bytes(legacy)),
            (f"{layer_id}/layer.tar", tar),
        ]
        layer_paths.append(f"{layer_id}/layer.tar")
        parent = layer_id
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_paths}]
    members.append(("manifest.json", _json_bytes(manifest)))
    repo, _, tag = repo_tag.rpartition(":")
    members.append(("repositories", _json_bytes({repo: {tag: parent}})))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        dirs_done: set[str] = set()
        for name, data in members:
            head = name.rpartition("/")[0]
            if head and head not in dirs_done:
                info = tarfile.TarInfo(head)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, DEFAULT_MTIME
                tf.addfile(info)
                dirs_done.add(head)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, DEFAULT_MTIME
            tf.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _per_layer(compression: Sequence[Compression] | Compression, n: int) -> list[Compression]:
    if isinstance(compression, str):
        return [compression] * n
    codecs = list(compression)
    if len(codecs) != n:
        raise ValueError(f"{len(codecs)} compressions for {n} layers")
    return codecs


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(layout_dir: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = _digest(data)
    blob = layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        tmp = blob.with_name(blob.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.rename(blob)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _config_json(config: ImageConfig, diff_ids: list[str]) -> bytes:
    created = "2023-11-14T22:13:20Z"  # DEFAULT_MTIME
    return _json_bytes(
        {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": created, "created_by": f"tests.helpers.ocibuild layer {i}"}
                for i in range(len(diff_ids))
            ],
        }
    )
