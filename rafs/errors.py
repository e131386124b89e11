"""The rafs exception tree, and the one place that maps it to errno.

    RafsError
    ├── UsageError         the command line is wrong (an unknown option, a bad value)
    ├── FormatError        a bootstrap or structure is malformed (names the offset)
    ├── DigestError        bytes do not match the digest that vouches for them
    ├── ImageError         an OCI image, layout, manifest or reference is unusable
    │   └── MediaTypeError an unknown or unexpected media type
    ├── ConfigError        a configuration file is unusable (names the file)
    └── BackendError       fetching bytes failed (I/O, network, registry)
        ├── AuthError      the registry refused our credentials, or wants some
        └── TransientError worth retrying (connection reset, 5xx, 429, truncation)

Every message is one line meant for a user; the CLI prints it without a traceback
(``runtime.cli.main``) and exits with ``runtime.errors.exit_status`` of it.
"""

from __future__ import annotations

import errno


class RafsError(Exception):
    """Base of every error rafs raises on purpose."""

    errno: int = errno.EIO


class UsageError(RafsError):
    """The command line is wrong; ``prog`` is the command it is about (``rafs run``)."""

    errno = errno.EINVAL

    def __init__(self, message: str, prog: str = "rafs") -> None:
        super().__init__(message)
        self.prog = prog

    @property
    def command(self) -> str | None:
        """The subcommand (``run``), None for the top level."""
        words = self.prog.split()
        return words[1] if len(words) > 1 else None


class FormatError(RafsError):
    """A bootstrap or on-disk structure is malformed."""

    def __init__(self, what: str, offset: int | None = None) -> None:
        self.offset = offset
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"bad bootstrap{where}: {what}")


class DigestError(RafsError):
    """Bytes do not match the digest that vouches for them."""


class ImageError(RafsError):
    """An OCI image, layout, manifest or reference is unusable."""

    errno = errno.ENOENT


class MediaTypeError(ImageError):
    """An unknown or unexpected media type."""

    errno = errno.EINVAL


class ConfigError(RafsError):
    """A configuration file (a registry's ``hosts.toml``, ...) is unusable; the
    message names the file."""

    errno = errno.EINVAL


class BackendError(RafsError):
    """Fetching bytes from a backend failed."""


class AuthError(BackendError):
    """A registry refused access: no, wrong or insufficient credentials."""

    errno = errno.EACCES


class TransientError(BackendError):
    """A backend failure that is worth retrying.

    ``error_class`` names the kind of failure for counters ("connection",
    "timeout", "5xx", "429", "truncated", ...); ``retry_after`` is the delay in
    seconds a server asked for, if any.
    """

    def __init__(self, message: str, *, error_class: str = "other",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retry_after = retry_after


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE reply or exit status should carry for ``exc``."""
    if isinstance(exc, RafsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
