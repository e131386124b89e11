"""The snapshotter's errors: a branch of the rafs tree, each carrying the gRPC code
containerd expects for it.

    RafsError                        (rafs.errors)
    └── SnapshotterError             INTERNAL            anything else that went wrong
        ├── NotFoundError            NOT_FOUND           no snapshot with that key
        ├── AlreadyExistsError       ALREADY_EXISTS      the key or name is taken (and a
        │                                                remote layer that is ready)
        ├── FailedPreconditionError  FAILED_PRECONDITION wrong kind, snapshot has children
        └── InvalidArgumentError     INVALID_ARGUMENT    bad key, parent, field path, filter

``snapshotter.service`` maps them to status codes in one place; containerd's
client turns those codes back into its ``errdefs`` errors.
"""

from __future__ import annotations

import errno

from rafs.errors import RafsError

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "SnapshotterError",
]


class SnapshotterError(RafsError):
    """Base of the snapshotter's errors."""

    grpc_code = "INTERNAL"


class NotFoundError(SnapshotterError):
    grpc_code = "NOT_FOUND"
    errno = errno.ENOENT


class AlreadyExistsError(SnapshotterError):
    grpc_code = "ALREADY_EXISTS"
    errno = errno.EEXIST


class FailedPreconditionError(SnapshotterError):
    grpc_code = "FAILED_PRECONDITION"
    errno = errno.EBUSY


class InvalidArgumentError(SnapshotterError):
    grpc_code = "INVALID_ARGUMENT"
    errno = errno.EINVAL
