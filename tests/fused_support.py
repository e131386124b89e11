"""Images for the fused tests, written straight through the builder (no converter).

``write_rafs_image`` turns an ``ImageParts`` (tests/helpers/images.py) into a
complete RAFS image in an OCI layout: one ``application/vnd.oci.image.layer.rafs.blob.v1``
layer per blob and the zstd bootstrap layer last, as the converter lays it
out. ``CountingBackend`` wraps a real backend and counts what it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import zstandard

from fused.backend import Backend, LocalBackend
from fused.cache import ChunkCache
from fused.fetcher import Fetcher
from fused.stats import Stats
from fused.vfs import Vfs
from rafs.bootstrap import Bootstrap
from rafs.oci import (
    ANNOTATION_RAFS_BLOB,
    ANNOTATION_RAFS_BOOTSTRAP,
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    ANNOTATION_RAFS_VERSION,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_RAFS_BLOB,
    MEDIA_TYPE_RAFS_BOOTSTRAP,
    RAFS_VERSION,
    OCILayout,
)
from tests.helpers.images import ImageParts


@dataclass
class WrittenImage:
    ref: str
    layout: Path
    bootstrap: bytes
    blob_digests: list[str]


def write_rafs_image(
    parts: ImageParts, layout_dir: Path, tag: str = "latest", prefetch: tuple[bytes, ...] = ()
) -> WrittenImage:
    boot = parts.finish(prefetch)
    layout = OCILayout.create(layout_dir)
    layers = []
    digests = []
    for data in parts.blob_data:
        d = layout.put_blob_bytes(bytes(data), MEDIA_TYPE_RAFS_BLOB, {ANNOTATION_RAFS_BLOB: "true"})
        layers.append(d.to_json())
        digests.append(d.digest)
    packed = zstandard.ZstdCompressor(level=3).compress(boot)
    d = layout.put_blob_bytes(packed, MEDIA_TYPE_RAFS_BOOTSTRAP, {
        ANNOTATION_RAFS_BOOTSTRAP: "true",
        ANNOTATION_RAFS_BOOTSTRAP_DIGEST: "sha256:" + hashlib.sha256(boot).hexdigest(),
    })
    layers.append(d.to_json())
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}, "config": {}}).encode()
    c = layout.put_blob_bytes(config, MEDIA_TYPE_OCI_CONFIG)
    layout.put_manifest({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST, "config": c.to_json(),
        "layers": layers, "annotations": {ANNOTATION_RAFS_VERSION: RAFS_VERSION},
    }, tag)
    return WrittenImage(f"oci:{layout_dir}:{tag}", layout_dir, boot, digests)


@dataclass
class CountingBackend(Backend):
    """A real backend with a record of every read it serves."""

    inner: Backend
    reads: list[tuple[str, int, int]] = field(default_factory=list)

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        self.reads.append((blob_digest, offset, length))
        return await self.inner.read(blob_digest, offset, length)

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        self.reads.append((blob_digest, offset, length))
        async for piece in self.inner.stream(blob_digest, offset, length):
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Stack:
    """The daemon's pieces, wired as the daemon wires them, minus FUSE."""

    bootstrap: Bootstrap
    backend: CountingBackend
    stats: Stats
    cache: ChunkCache
    fetcher: Fetcher
    vfs: Vfs


@asynccontextmanager
async def open_stack(
    image: WrittenImage, cache_dir: Path, backend: Backend | None = None, *,
    validate: bool = True, **fetcher_kw: Any
) -> AsyncIterator[Stack]:
    """Run the cache committer and the fetcher for ``image``; close everything after.

    Amplification is off unless asked for, so tests see exactly the reads they cause.
    ``validate=False`` skips the bootstrap validator, to show what the layers below it
    do with a record it would have refused.
    """
    fetcher_kw.setdefault("amplify", False)
    bootstrap = Bootstrap.from_bytes(image.bootstrap, validate=validate)
    counting = CountingBackend(backend or LocalBackend(image.layout))
    stats = Stats()
    cache = ChunkCache(cache_dir, bootstrap.blobs, bootstrap.chunk, stats)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fetcher = Fetcher(cache, counting, stats, **fetcher_kw)
            async with fetcher.running():
                yield Stack(bootstrap, counting, stats, cache, fetcher, Vfs(bootstrap, fetcher))
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
        await counting.aclose()
