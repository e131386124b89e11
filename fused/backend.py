"""Blob backends: where the daemon gets compressed chunk bytes from.

A backend is a small async ABC with one data method, ``read(blob_digest,
offset, length)``, returning exactly ``length`` bytes of the stored blob or
raising ``BackendError`` (``TransientError`` when a retry may help). Backends
never verify chunks: the fetcher does, against the sha256 in the bootstrap.

``BACKENDS`` maps an image-reference transport (the part before the first
``:`` of ``oci:DIR[:TAG]``) to the backend class that serves it;
``open_backend`` is the only constructor callers need.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import trio

from rafs.errors import BackendError, ImageError
from rafs.oci import OCILayout

__all__ = ["BACKENDS", "Backend", "LocalBackend", "open_backend"]

log = logging.getLogger(__name__)


class Backend(ABC):
    """Reads byte ranges of blobs addressed by their OCI digest."""

    scheme: ClassVar[str]

    @abstractmethod
    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the blob, or a BackendError."""

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

    def __init__(self, layout_path: str | os.PathLike[str]) -> None:
        self.layout = OCILayout(Path(layout_path))  # ImageError if it is not a layout
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # _fds is touched from worker threads

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


BACKENDS: dict[str, type[Backend]] = {
    LocalBackend.scheme: LocalBackend,
}


def open_backend(transport: str, location: str) -> Backend:
    """The backend serving images of ``transport`` found at ``location``."""
    try:
        cls = BACKENDS[transport]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ImageError(f"no backend for transport {transport!r} (known: {known})") from None
    return cls(location)  # type: ignore[call-arg]
