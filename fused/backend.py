"""Blob backends: where the daemon gets compressed chunk bytes from.

A backend is a small async ABC with one data method, ``read(blob_digest,
offset, length)``, returning exactly ``length`` bytes of the stored blob or
raising ``BackendError`` (``TransientError`` when a retry may help), and
``stream`` (the same bytes as an async iterator of pieces, so the fetcher can
release each chunk of a long range as soon as it has arrived). Backends
never verify chunks: the fetcher does, against the sha256 in the bootstrap.

A backend also knows where its image lives: ``resolve()`` returns the image's
manifest (the root of the trust chain, ``rafs.trust``), and ``read_blob`` a
whole small blob (the bootstrap layer), retried where the backend can fail
transiently; ``name`` is the image as messages name it.

A backend may have several sources for the same bytes (a registry's mirrors
and the registry itself): ``sources`` says how many, and ``distrust(blob,
offset, length)`` is the fetcher telling it that the bytes it sent there did
not verify, so that the next read of them comes from another source.

``BACKENDS`` maps an image-reference transport (``oci``, ``docker``) to the
backend class that serves it; ``open_backend(ref, options)`` is the only
constructor callers need.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

import trio

from rafs.errors import BackendError, ImageError, TransientError
from rafs.oci import ImageRef, Manifest, OCILayout

from .options import BackendOptions
from .stats import Stats

if TYPE_CHECKING:
    from rafs.registry import Endpoint

__all__ = ["BACKENDS", "Backend", "BackendOptions", "LocalBackend", "RegistryBackend",
           "open_backend"]

log = logging.getLogger(__name__)


class Backend(ABC):
    """Reads byte ranges of blobs addressed by their OCI digest."""

    scheme: ClassVar[str]
    name: str = "the image"  # the image, as messages name it
    stats: Stats | None = None  # set by the daemon: backends count protocol oddities here

    @classmethod
    def from_ref(cls, ref: ImageRef, options: BackendOptions) -> Self:
        raise NotImplementedError

    async def resolve(self) -> Manifest:
        """The manifest of the image this backend serves (``rafs.trust`` checks that it
        is a RAFS image)."""
        raise ImageError(f"{self.scheme} backends cannot resolve an image")

    async def read_blob(self, blob_digest: str, size: int) -> bytes:
        """A whole blob of ``size`` bytes (the bootstrap layer); the caller verifies it."""
        return await self.read(blob_digest, 0, size)

    @abstractmethod
    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the blob, or a BackendError."""

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """The same bytes as ``read``, in pieces as they arrive (a short stream is
        a truncated response: the fetcher asks again for the rest)."""
        yield await self.read(blob_digest, offset, length)

    @property
    def sources(self) -> int:
        """How many independent sources can serve a byte range (a refetch of bytes
        that did not verify is worth this many tries)."""
        return 1

    def distrust(self, blob_digest: str, offset: int, length: int) -> None:
        """The bytes ``[offset, offset+length)`` of the blob, as last read, did not
        match their digest: read them from elsewhere next time, if there is a choice."""
        return None

    async def aclose(self) -> None:
        """Release connections and file descriptors."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class LocalBackend(Backend):
    """Blobs of an OCI image layout directory (``blobs/<alg>/<hex>``), read with pread.

    Each blob file is opened once and kept open; ``os.pread`` runs in a trio
    worker thread so a slow disk never stalls the event loop.
    """

    scheme = "oci"

    def __init__(self, layout_path: str | os.PathLike[str], tag: str | None = None) -> None:
        self.layout = OCILayout(Path(layout_path))  # ImageError if it is not a layout
        self.tag = tag
        self.name = f"oci:{self.layout.path}" + (f":{tag}" if tag else "")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # _fds is touched from worker threads

    @classmethod
    def from_ref(cls, ref: ImageRef, options: BackendOptions) -> Self:
        return cls(ref.path, ref.tag)

    async def resolve(self) -> Manifest:
        return await trio.to_thread.run_sync(self.layout.resolve, self.tag)

    def blob_path(self, blob_digest: str) -> Path:
        return self.layout.blob_path(blob_digest)

    def _fd(self, blob_digest: str) -> int:
        with self._lock:
            fd = self._fds.get(blob_digest)
            if fd is None:
                path = self.blob_path(blob_digest)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise BackendError(f"blob {blob_digest}: {e.strerror}: {path}") from None
                self._fds[blob_digest] = fd
            return fd

    def _pread(self, blob_digest: str, offset: int, length: int) -> bytes:
        fd = self._fd(blob_digest)
        try:
            data = os.pread(fd, length, offset)
        except OSError as e:
            raise BackendError(f"blob {blob_digest}: read at {offset}: {e.strerror}") from None
        if len(data) != length:
            raise BackendError(
                f"blob {blob_digest}: short read at {offset}: {len(data)} of {length} bytes"
            )
        return data

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self._pread, blob_digest, offset, length)

    async def aclose(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class RegistryBackend(Backend):
    """Blobs of an image in an OCI registry, read with HTTP Range requests on a
    keep-alive connection pool (``rafs.registry.AsyncRegistryClient``).

    ``read`` and ``stream`` are one attempt per call on each endpoint of the
    registry (mirrors, then the registry: ``rafs.hosts``): the fetcher owns
    their retries, and learns from the ``TransientError`` raised here whether
    (and after how long) to retry. ``resolve`` and ``read_blob`` are retried by
    the client, under its ``rafs.retry.RetryPolicy``. Which endpoint sent which
    bytes is remembered for the last ``SERVED`` ranges, so that ``distrust``
    blames the right one. The endpoints' counters and states are in ``stats``
    (``rafs stats``: ``endpoints``).
    """

    scheme = "docker"
    SERVED = 1024

    def __init__(self, ref: ImageRef, options: BackendOptions) -> None:
        from rafs.registry import AsyncRegistryClient

        self.ref = ref
        self.name = str(ref)
        self.client = AsyncRegistryClient.for_ref(
            ref, insecure=options.insecure, creds=options.creds, timeout=options.timeout,
            max_connections=options.max_connections, hosts_dir=options.hosts_dir)
        # (blob digest, start, end, endpoint) of the ranges read lately
        self._served: deque[tuple[str, int, int, Endpoint]] = deque(maxlen=self.SERVED)
        self._stats: Stats | None = None

    @property  # type: ignore[override]
    def stats(self) -> Stats | None:
        return self._stats

    @stats.setter
    def stats(self, stats: Stats | None) -> None:
        self._stats = stats
        if stats is not None:
            stats.endpoints = {e.name: self.client.health[e] for e in self.client.endpoints}

    @property
    def sources(self) -> int:
        return len(self.client.pull_endpoints)

    def distrust(self, blob_digest: str, offset: int, length: int) -> None:
        end = offset + length
        blamed = {e for digest, start, stop, e in self._served
                  if digest == blob_digest and start < end and offset < stop}
        for e in blamed:
            self.client.distrust(e, f"blob {blob_digest} bytes {offset}-{end - 1} did not "
                                 "match their digest")

    @classmethod
    def from_ref(cls, ref: ImageRef, options: BackendOptions) -> Self:
        return cls(ref, options)

    async def resolve(self) -> Manifest:
        return await self.client.resolve(self.ref)

    async def read_blob(self, blob_digest: str, size: int) -> bytes:
        return await self.client.get_blob(self.ref.repository, blob_digest, size)

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        pieces = [piece async for piece in self.stream(blob_digest, offset, length)]
        data = b"".join(pieces)
        if len(data) != length:
            raise TransientError(f"blob {blob_digest}: {len(data)} of {length} bytes arrived",
                                 error_class="truncated")
        return data

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        ignored = self.client.counters.range_ignored
        sources: list[tuple[int, Endpoint]] = []
        try:
            async with aclosing(self.client.stream_range(self.ref.repository, blob_digest,
                                                         offset, length,
                                                         sources=sources)) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            ends = [start for start, _ in sources[1:]] + [offset + length]
            for (start, endpoint), stop in zip(sources, ends[:len(sources)], strict=True):
                self._served.append((blob_digest, start, stop, endpoint))
            if self.stats is not None:
                self.stats.range_ignored += self.client.counters.range_ignored - ignored

    async def aclose(self) -> None:
        await self.client.aclose()


BACKENDS: dict[str, type[Backend]] = {
    LocalBackend.scheme: LocalBackend,
    RegistryBackend.scheme: RegistryBackend,
}


def open_backend(ref: ImageRef, options: BackendOptions | None = None) -> Backend:
    """The backend serving the image ``ref``."""
    try:
        cls = BACKENDS[ref.transport]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ImageError(f"{ref}: no backend for transport {ref.transport!r} "
                         f"(known: {known})") from None
    return cls.from_ref(ref, options or BackendOptions())
