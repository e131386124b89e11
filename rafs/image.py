"""A RAFS image as a whole: its manifest, verified bootstrap and blobs, in an OCI
layout (``LocalImage``) or a registry (``RemoteImage``); ``open_image`` opens either.

Opening an image walks the trust chain (``rafs.trust``) down to the verified
uncompressed bootstrap; ``check`` goes on to every blob and every chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from . import codec
from .bootstrap import Bootstrap
from .errors import DigestError, ImageError
from .oci import (
    ImageRef,
    Manifest,
    OCILayout,
    bootstrap_descriptor,
    parse_image_ref,
)
from .trust import bootstrap_layer, verify_bootstrap

if TYPE_CHECKING:
    from .registry import RegistryClient


@dataclass
class LocalImage:
    layout: OCILayout
    manifest: Manifest
    bootstrap: bytes

    def open_blob(self, digest: str) -> BinaryIO:
        return self.layout.open_blob(digest)


@dataclass
class RemoteImage:
    client: RegistryClient
    ref: ImageRef
    manifest: Manifest
    bootstrap: bytes

    def open_blob(self, digest: str) -> BinaryIO:
        return self.client.open_blob(self.ref.repository, digest)


def open_local_image(ref: str) -> LocalImage:
    """Resolve ``oci:DIR[:TAG]`` to a RAFS image with its bootstrap verified."""
    parsed = parse_image_ref(ref)
    if parsed.transport != "oci":
        raise ImageError(f"{ref}: only oci:DIR[:TAG] images can be used here so far")
    layout = OCILayout(parsed.path)
    manifest = layout.resolve(parsed.tag)
    desc = bootstrap_layer(manifest, ref)
    payload = layout.read_blob(desc.digest, max_size=desc.size)
    return LocalImage(layout, manifest, verify_bootstrap(manifest, payload, name=ref).raw)


@contextlib.contextmanager
def open_image(ref: str, *, creds: tuple[str, str] | None = None,
               insecure: bool | None = None) -> Iterator[LocalImage | RemoteImage]:
    """A RAFS image from ``oci:DIR[:TAG]`` or ``docker://...``, bootstrap verified."""
    parsed = parse_image_ref(ref)
    if parsed.transport != "docker":
        yield open_local_image(ref)
        return
    from .registry import RegistryClient, fetch_bootstrap

    with RegistryClient.for_ref(parsed, creds=creds, insecure=insecure) as client:
        manifest, raw = fetch_bootstrap(client, parsed)
        yield RemoteImage(client, parsed, manifest, raw)


@dataclass
class Summary:
    """What `rafs inspect` reports."""

    layers: list[dict[str, object]] = field(default_factory=list)
    files: int = 0
    directories: int = 0
    other: int = 0
    inodes: int = 0
    chunks: int = 0
    chunk_refs: int = 0
    file_bytes: int = 0
    unique_bytes: int = 0
    blob_bytes: int = 0
    bootstrap_bytes: int = 0
    bootstrap_layer_bytes: int = 0
    chunk_size: int = 0
    prefetch_files: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.file_bytes / self.unique_bytes if self.unique_bytes else 1.0


def summarize(image: LocalImage | RemoteImage) -> Summary:
    boot = Bootstrap.from_bytes(image.bootstrap)
    s = Summary(chunk_size=boot.chunk_size, inodes=boot.inode_count,
                bootstrap_bytes=len(image.bootstrap), prefetch_files=len(boot.prefetch))
    for desc in image.manifest.layers:
        s.layers.append({"digest": desc.digest, "size": desc.size, "media_type": desc.media_type})
    seen: set[int] = set()
    for _path, ino in boot.walk():
        if ino.nid in seen:
            continue
        seen.add(ino.nid)
        if stat.S_ISREG(ino.mode):
            s.files += 1
            s.file_bytes += ino.size
            s.chunk_refs += sum(1 for c in boot.file_chunks(ino) if c is not None)
        elif ino.is_dir:
            s.directories += 1
        else:
            s.other += 1
    s.chunks = boot.header.chunk_count
    s.unique_bytes = sum(c.uncompressed_size for c in boot.chunks())
    s.blob_bytes = sum(b.compressed_size for b in boot.blobs)
    s.bootstrap_layer_bytes = bootstrap_descriptor(image.manifest).size
    return s


def check(image: LocalImage | RemoteImage,
          progress: Callable[[int], None] | None = None) -> int:
    """Verify bootstrap structure, every blob digest and every chunk; return chunks checked."""
    boot = Bootstrap.from_bytes(image.bootstrap)
    for _path, ino in boot.walk():  # structure: every inode, dirent, xattr, chunk index
        boot.xattrs(ino)
        if stat.S_ISLNK(ino.mode):
            boot.readlink(ino)
        elif stat.S_ISREG(ino.mode):
            for ref in boot.file_chunks(ino):
                if ref is not None:
                    boot.chunk(ref)
    layer_digests = {d.digest for d in image.manifest.layers}
    checked = 0
    for index, blob in enumerate(boot.blobs):
        if blob.digest not in layer_digests:
            raise ImageError(f"blob {index} ({blob.digest}) is not a layer of the manifest")
        whole = hashlib.sha256()
        with image.open_blob(blob.digest) as f:
            pos = 0
            for i in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
                chunk = boot.chunk(i)
                if chunk.compressed_offset < pos:
                    raise DigestError(f"blob {blob.digest}: chunks out of order at chunk {i}")
                gap = f.read(chunk.compressed_offset - pos)
                whole.update(gap)
                payload = f.read(chunk.compressed_size)
                whole.update(payload)
                pos = chunk.compressed_offset + len(payload)
                try:
                    codec.decode_chunk(chunk, payload)
                except DigestError as e:
                    raise DigestError(f"blob {blob.digest}: {e}") from None
                checked += 1
                if progress:
                    progress(chunk.compressed_size)
            while block := f.read(1 << 20):
                whole.update(block)
        if "sha256:" + whole.hexdigest() != blob.digest:
            raise DigestError(f"blob {blob.digest} does not match its digest")
    return checked
