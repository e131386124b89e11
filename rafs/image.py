"""A RAFS image as a whole: its manifest, verified bootstrap and blobs, in an OCI
layout (``LocalImage``) or a registry (``RemoteImage``); ``open_image`` opens either.

Opening an image walks the trust chain (``rafs.trust``) down to the verified
uncompressed bootstrap; ``check`` goes on to every blob and every chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import codec
from .bootstrap import Bootstrap
from .errors import DigestError, ImageError
from .fsck import fsck_erofs
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
        raise ImageError(f"{ref}: not an OCI image layout reference (oci:DIR[:TAG])")
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
    """What `rafs inspect` reports.

    Byte counts are uncompressed unless named ``blob``. ``file_bytes`` counts each
    regular file of the merged tree (the image as mounted) once, however many
    names it has; it is ``hole_bytes`` (all-zero chunks, not stored) plus
    ``dedup_saved_bytes`` (chunks stored once for several files or places) plus
    ``referenced_chunk_bytes``. The chunk table may hold more than the merged
    tree uses: ``unreferenced_chunk_bytes`` is the data of files that upper
    layers replace or delete (and unused chunks of a chunk dictionary's blobs),
    kept because each blob is a source layer's.
    """

    layers: list[dict[str, object]] = field(default_factory=list)
    files: int = 0
    directories: int = 0
    other: int = 0
    inodes: int = 0
    chunks: int = 0  # in the chunk table
    chunk_refs: int = 0  # chunk indexes of the merged tree's files, holes excluded
    referenced_chunks: int = 0  # distinct chunks the merged tree's files use
    file_bytes: int = 0
    hole_bytes: int = 0
    dedup_saved_bytes: int = 0
    referenced_chunk_bytes: int = 0
    unreferenced_chunk_bytes: int = 0
    stored_chunk_bytes: int = 0  # every chunk of the table
    blob_bytes: int = 0  # compressed, as stored in the registry
    bootstrap_bytes: int = 0
    bootstrap_layer_bytes: int = 0
    chunk_size: int = 0
    prefetch_files: int = 0


def summarize(image: LocalImage | RemoteImage) -> Summary:
    boot = Bootstrap.from_bytes(image.bootstrap)
    s = Summary(chunk_size=boot.chunk_size, inodes=boot.inode_count,
                bootstrap_bytes=len(image.bootstrap), prefetch_files=len(boot.prefetch))
    for desc in image.manifest.layers:
        s.layers.append({"digest": desc.digest, "size": desc.size, "media_type": desc.media_type})
    seen: set[int] = set()
    used: set[int] = set()
    for _path, ino in boot.walk():
        if ino.nid in seen:
            continue
        seen.add(ino.nid)
        if stat.S_ISREG(ino.mode):
            s.files += 1
            s.file_bytes += ino.size
            for i, ref in enumerate(boot.file_chunks(ino)):
                if ref is None:
                    s.hole_bytes += min(boot.chunk_size, ino.size - i * boot.chunk_size)
                else:
                    s.chunk_refs += 1
                    used.add(ref)
        elif ino.is_dir:
            s.directories += 1
        else:
            s.other += 1
    s.chunks = boot.header.chunk_count
    s.referenced_chunks = len(used)
    for i, chunk in enumerate(boot.chunks()):
        s.stored_chunk_bytes += chunk.uncompressed_size
        if i in used:
            s.referenced_chunk_bytes += chunk.uncompressed_size
    s.unreferenced_chunk_bytes = s.stored_chunk_bytes - s.referenced_chunk_bytes
    s.dedup_saved_bytes = s.file_bytes - s.hole_bytes - s.referenced_chunk_bytes
    s.blob_bytes = sum(b.compressed_size for b in boot.blobs)
    s.bootstrap_layer_bytes = bootstrap_descriptor(image.manifest).size
    return s


def check(image: LocalImage | RemoteImage,
          progress: Callable[[int], None] | None = None) -> int:
    """Verify the bootstrap structure (``rafs.validate``, then ``fsck.erofs`` where
    installed), every blob digest and every chunk; return the number of chunks checked.

    Reads are bounded by what the validator accepted: a chunk is at most the
    chunk size, gaps between chunks are copied in pieces of 1 MiB, chunks are
    read in blob order whatever the table order.
    """
    boot = Bootstrap.from_bytes(image.bootstrap)  # every structural rule, or FormatError
    with tempfile.TemporaryDirectory(prefix="rafs-check-") as tmp:
        path = Path(tmp) / "bootstrap"
        path.write_bytes(image.bootstrap)
        fsck_erofs(path, len(boot.blobs))
    layer_sizes = {d.digest: d.size for d in image.manifest.layers}
    checked = 0
    for index, blob in enumerate(boot.blobs):
        size = layer_sizes.get(blob.digest)
        if size is None:
            raise ImageError(f"blob {index} ({blob.digest}) is not a layer of the manifest")
        if size != blob.compressed_size:
            raise ImageError(f"blob {index} ({blob.digest}) is {blob.compressed_size} bytes in "
                             f"the bootstrap but {size} in the manifest")
        order = sorted((boot.chunk(i) for i in
                        range(blob.chunk_start, blob.chunk_start + blob.chunk_count)),
                       key=lambda c: c.compressed_offset)
        whole = hashlib.sha256()
        with image.open_blob(blob.digest) as f:
            pos = 0
            for chunk in order:
                _copy(f, chunk.compressed_offset - pos, whole)
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
            while block := f.read(_PIECE):
                whole.update(block)
        if "sha256:" + whole.hexdigest() != blob.digest:
            raise DigestError(f"blob {blob.digest} does not match its digest")
    return checked


_PIECE = 1 << 20


def _copy(f: BinaryIO, n: int, into: hashlib._Hash) -> None:
    """Hash the next ``n`` bytes of ``f`` in bounded pieces (fewer if it ends first)."""
    while n > 0:
        block = f.read(min(n, _PIECE))
        if not block:
            return
        into.update(block)
        n -= len(block)
