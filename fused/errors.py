"""The daemon's errors: a branch of the rafs tree, each carrying its errno.

    RafsError                      (rafs.errors)
    └── FusedError                 something the daemon or its CLI could not do
        ├── NoEntryError           ENOENT   no such inode or name
        ├── NotDirectoryError      ENOTDIR  a directory operation on a non-directory
        ├── NotASymlinkError       EINVAL   readlink of something that is not a symlink
        ├── NoAttributeError       ENODATA  no such extended attribute
        ├── ReadOnlyError          EROFS    any attempt to change the filesystem
        ├── ChunkError             EIO      a chunk could not be fetched or verified
        ├── CacheError             EIO      the cache directory is unusable
        │   └── UnknownImageError  ENOENT   `rafs cache` names an image the cache lacks
        ├── ConfigError            EINVAL   a SIZE, or the host config file, is bad
        ├── MountError             EIO      mounting or unmounting failed
        │   ├── NotMountedError    EINVAL   a path is not a rafs mount
        │   ├── NotOwnerError      EPERM    another user's rafs serves the mount
        │   └── KernelModeError    EIO      `--mode kernel` on a host that cannot do it
        └── ControlError           EIO      the control socket did not answer

The errno of any exception is computed by ``rafs.errors.to_errno``; the FUSE
adapter base (``fused.adapter``) calls it in exactly one place.
"""

from __future__ import annotations

import errno

from rafs.errors import RafsError

__all__ = [
    "CacheError",
    "ChunkError",
    "ConfigError",
    "ControlError",
    "FusedError",
    "KernelModeError",
    "MountError",
    "NoAttributeError",
    "NoEntryError",
    "NotASymlinkError",
    "NotDirectoryError",
    "NotMountedError",
    "NotOwnerError",
    "ReadOnlyError",
    "UnknownImageError",
]


class FusedError(RafsError):
    """Base of the daemon's errors."""


class NoEntryError(FusedError):
    errno = errno.ENOENT


class NotDirectoryError(FusedError):
    errno = errno.ENOTDIR


class NotASymlinkError(FusedError):
    errno = errno.EINVAL


class NoAttributeError(FusedError):
    errno = errno.ENODATA


class ReadOnlyError(FusedError):
    errno = errno.EROFS


class ChunkError(FusedError):
    """A chunk could not be made available: the reader gets EIO, never wrong bytes."""

    errno = errno.EIO


class CacheError(FusedError):
    errno = errno.EIO


class UnknownImageError(CacheError):
    errno = errno.ENOENT


class ConfigError(FusedError):
    errno = errno.EINVAL


class MountError(FusedError):
    errno = errno.EIO


class NotMountedError(MountError):
    errno = errno.EINVAL


class NotOwnerError(MountError):
    """The mount is another user's (``rafs stats|trace|umount`` by a user on root's
    mount): nothing is touched, the message says whom to run as."""

    errno = errno.EPERM


class KernelModeError(MountError):
    """Kernel mode was asked for and this host cannot do it (``fused.kernelmount``)."""


class ControlError(FusedError):
    errno = errno.EIO
