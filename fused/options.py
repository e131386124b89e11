"""What a mount can be told: the fetch defaults and the backend options.

Shared by the command line and the daemon, and kept free of trio, httpx and
FUSE so that `rafs mount` and `rafs run` start quickly: they only spawn and
talk to a daemon, which imports the heavy parts itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOB_MOUNT_OPTIONS", "DEFAULT_AMPLIFY", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_RETRIES",
           "MOUNT_OPTIONS", "BackendOptions"]

DEFAULT_AMPLIFY = 1 << 20  # an on-demand fetch grows to this many bytes of following chunks
DEFAULT_RETRIES = 4
DEFAULT_FETCH_TIMEOUT = 30.0  # seconds without a byte before a fetch counts as failed

# libfuse mount options of the image mount (fuse mode) and of the blob filesystem
# (kernel mode). Here, not in the adapters, so a supervisor can mount without pyfuse3.
MOUNT_OPTIONS = frozenset(
    {"ro", "allow_other", "default_permissions", "fsname=rafs", "subtype=rafs"}
)
# allow_other: the EROFS driver may read the blob files on behalf of any user's
# page fault; the run directory (0700) keeps everyone else out of the mount.
BLOB_MOUNT_OPTIONS = frozenset({"ro", "allow_other", "default_permissions",
                                "fsname=rafs-blobs", "subtype=rafs-blobs"})


@dataclass(frozen=True)
class BackendOptions:
    """How to reach a remote image (ignored by local backends)."""

    insecure: bool | None = None  # None: plain HTTP for localhost only
    creds: tuple[str, str] | None = None
    timeout: float = 30.0
    max_connections: int = 8
    hosts_dir: str | None = None  # containerd's hosts.toml layout (None: rafs.hosts' default)
