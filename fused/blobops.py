"""The pyfuse3 adapter of the blob filesystem (kernel mode): requests in, ``BlobFs`` out.

Every handler and the error boundary live in ``fused.adapter.BaseOperations``,
shared with fuse mode. The blob files never change while mounted, so the
kernel may cache entries and attributes for as long as it likes. Blob files
are opened with ``direct_io``: the EROFS page cache above already holds what
was read, a second copy in the blob files' page cache would only cost memory,
and FUSE readahead on a blob file would fetch neighbouring files' chunks that
nobody asked for. Direct reads also come in whole (up to 1 MiB) requests.

Reads of cached data are answered from one reply buffer the adapter keeps
(``BlobFs.read``'s ``scratch``) instead of a new 1 MiB bytes object per
request: a warm sequential read of a large file is a stream of 1 MiB requests
that the EROFS driver sends one at a time, each waiting for the last, so the
daemon's time per request is the read's speed. Measured (README, "Kernel
mode": the 1 GiB file of ``bench.modes``, page cache dropped, old and new
daemon interleaved, median of 10 on this 2-core host under other jobs' load):
287 MB/s and 1.81 s of daemon CPU per GiB with a new object per request,
850 MB/s and 0.62 s with the reused buffer (local disk 1,277 MB/s).

Reusing it is safe because pyfuse3 writes the reply (``fuse_reply_buf``) as
soon as the handler returns, before any other task runs, and ``BlobFs`` fills
the buffer only after its last ``await``: no two requests ever see it at once.
"""

from __future__ import annotations

import pyfuse3

from .adapter import BaseOperations, errno_boundary
from .blobfs import BlobFs
from .options import BLOB_MOUNT_OPTIONS
from .stats import Stats

__all__ = ["BLOB_MOUNT_OPTIONS", "BlobOperations"]

REPLY_BUFFER = 1 << 20  # the largest read the kernel sends (libfuse 3.14: 256 pages)


class BlobOperations(BaseOperations):
    """pyfuse3 request handlers over a ``BlobFs``."""

    direct_io = True

    def __init__(self, fs: BlobFs, stats: Stats | None = None) -> None:
        super().__init__(fs, stats)
        self.blobfs = fs
        self._reply = memoryview(bytearray(REPLY_BUFFER))

    @errno_boundary
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if size > len(self._reply):
            self._reply = memoryview(bytearray(size))
        return await self.blobfs.read(fh, off, size, self._reply)  # type: ignore[return-value]
