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
``rafs`` process. As docker and podman do, a failure of the runtime itself
(any error of ``rafs run`` or ``rafs optimize``, which pass the container's
own status through, and every ``RunError``) is 125, so a caller can tell it
from the container's status. Other commands exit 1 on an error.
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
CONTAINER_COMMANDS = frozenset({"run", "optimize"})  # their status is the container's


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


def exit_status(exc: BaseException, command: str | None = None) -> int:
    """The exit status of the ``rafs COMMAND`` process that failed with ``exc``."""
    if isinstance(exc, RunError) or command in CONTAINER_COMMANDS:
        return EXIT_RUNTIME
    return 1
