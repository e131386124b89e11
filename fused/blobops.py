"""The pyfuse3 adapter of the blob filesystem (kernel mode): requests in, ``BlobFs`` out.

Every handler and the error boundary live in ``fused.adapter.BaseOperations``,
shared with fuse mode. The blob files never change while mounted, so the
kernel may cache entries and attributes for as long as it likes. Blob files
are opened with ``direct_io``: the EROFS page cache above already holds what
was read, a second copy in the blob files' page cache would only cost memory,
and FUSE readahead on a blob file would fetch neighbouring files' chunks that
nobody asked for. Direct reads also come in whole (up to 1 MiB) requests.
"""

from __future__ import annotations

from .adapter import BaseOperations
from .blobfs import BlobFs
from .options import BLOB_MOUNT_OPTIONS
from .stats import Stats

__all__ = ["BLOB_MOUNT_OPTIONS", "BlobOperations"]


class BlobOperations(BaseOperations):
    """pyfuse3 request handlers over a ``BlobFs``."""

    direct_io = True

    def __init__(self, fs: BlobFs, stats: Stats | None = None) -> None:
        super().__init__(fs, stats)
