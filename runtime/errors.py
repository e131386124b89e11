"""The runtime's exception tree, and the one place that maps errors to exit statuses.

    RafsError                        (rafs.errors)
    └── RunError                     `rafs run`/`ps`/`rm`/`optimize` could not do its work
        ├── RuncMissingError         the OCI runtime binary (runc) is not installed
        ├── FuseMissingError         /dev/fuse is missing or unusable
        ├── NeedsRootError           the command needs root and was run by another user
        ├── NoCommandError           neither the image nor the command line names a command
        ├── CommandNotFoundError     the command is not in the image (exit 127)
        ├── CannotExecuteError       the command is in the image but cannot run (exit 126)
        ├── UnknownUserError         a user or group name is not in the image's passwd/group
        ├── ContainerNotFoundError   no container by that name or id
        ├── ContainerExistsError     the name is taken
        ├── ContainerRunningError    removing a running container without -f
        ├── UnpackError              a plain image could not be unpacked
        └── OptimizeError            `rafs optimize` cannot find or trace its source

``exit_status`` is the one mapping from an exception to the status of the
``rafs`` process; the README's "Exit status" table is this function:

=====  ============================================================================
0      success
1      an error (one ``rafs: error: ...`` line); ``rafs rm`` of several: any failed
2      a usage error: an unknown option, a bad value (``rafs COMMAND --help``)
3      ``rafs cache verify`` found (and dropped) bad chunks (``fused.cachecli``)
125    ``rafs run``/``rafs optimize``: rafs itself failed, usage errors included
       (as docker and podman do: their other statuses are the container's)
126    ``rafs run``/``optimize``: the command is in the image but cannot be executed
127    ``rafs run``/``optimize``: the command is not in the image
130    interrupted (SIGINT) before the work was done
141    stdout was closed (``rafs ... | head -1``): rafs stops quietly, as ``cat`` does
=====  ============================================================================

A container's own status passes through ``rafs run`` unchanged (128+N if
signal N ended it).
"""

from __future__ import annotations

import errno

from rafs.errors import RafsError, UsageError

__all__ = [
    "EXIT_CANNOT_EXECUTE",
    "EXIT_CLOSED_STDOUT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "CannotExecuteError",
    "CommandNotFoundError",
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerRunningError",
    "FuseMissingError",
    "NeedsRootError",
    "NoCommandError",
    "OptimizeError",
    "RunError",
    "RuncMissingError",
    "UnknownUserError",
    "UnpackError",
    "exit_status",
]

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's
EXIT_RUNTIME = 125  # rafs run itself failed
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_CLOSED_STDOUT = 141  # 128 + SIGPIPE, what a shell sees of `cat` on a closed pipe
CONTAINER_COMMANDS = frozenset({"run", "optimize"})  # their status is the container's


class RunError(RafsError):
    """Base of the runtime's errors."""

    errno = errno.EINVAL


class RuncMissingError(RunError):
    errno = errno.ENOENT


class FuseMissingError(RunError):
    errno = errno.ENODEV


class NeedsRootError(RunError):
    errno = errno.EPERM


class CommandNotFoundError(RunError):
    errno = errno.ENOENT


class CannotExecuteError(RunError):
    errno = errno.EACCES


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
    if isinstance(exc, UsageError) and exc.command is not None:
        command = exc.command
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, CommandNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, CannotExecuteError):
        return EXIT_CANNOT_EXECUTE
    if command in CONTAINER_COMMANDS:
        return EXIT_RUNTIME
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_ERROR
