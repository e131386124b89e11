"""The runtime's exception tree, and the one place that maps errors to exit statuses.

    RafsError                        (rafs.errors)
    └── RunError                     `rafs run`/`ps`/`rm`/`optimize` could not do its work
        ├── RuncMissingError         the OCI runtime binary (runc) is not installed
        ├── FuseMissingError         /dev/fuse is missing or unusable
        ├── NoCommandError           neither the image nor the command line names a command
        ├── UnknownUserError         a user or group name is not in the image's passwd/group
        ├── ContainerNotFoundError   no container by that name or id
        ├── ContainerExistsError     the name is taken
        ├── ContainerRunningError    removing a running container without -f
        ├── UnpackError              a plain image could not be unpacked
        └── OptimizeError            `rafs optimize` cannot find or trace its source

``exit_status`` is the one mapping from an exception to the status of the
``rafs`` process. As docker and podman do, a failure of the runtime itself is
125, so a caller can tell it from the container's own exit status (which
`rafs run` passes through unchanged). Other rafs errors keep status 1.
"""

from __future__ import annotations

import errno

from rafs.errors import RafsError

__all__ = [
    "EXIT_RUNTIME",
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerRunningError",
    "FuseMissingError",
    "NoCommandError",
    "OptimizeError",
    "RunError",
    "RuncMissingError",
    "UnknownUserError",
    "UnpackError",
    "exit_status",
]

EXIT_RUNTIME = 125  # rafs run itself failed


class RunError(RafsError):
    """Base of the runtime's errors."""

    errno = errno.EINVAL


class RuncMissingError(RunError):
    errno = errno.ENOENT


class FuseMissingError(RunError):
    errno = errno.ENODEV


class NoCommandError(RunError):
    errno = errno.EINVAL


class UnknownUserError(RunError):
    errno = errno.ENOENT


class ContainerNotFoundError(RunError):
    errno = errno.ENOENT


class ContainerExistsError(RunError):
    errno = errno.EEXIST


class ContainerRunningError(RunError):
    errno = errno.EBUSY


class UnpackError(RunError):
    errno = errno.EIO


class OptimizeError(RunError):
    errno = errno.EINVAL


def exit_status(exc: BaseException) -> int:
    """The exit status of the ``rafs`` process that failed with ``exc``."""
    if isinstance(exc, RunError):
        return EXIT_RUNTIME
    return 1
