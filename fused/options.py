"""What a mount can be told: ``MountOptions``, the one description of a daemon's options.

The command line builds it from its flags, the runtime and the snapshotter
build it in code, the client hands it to the daemon (``to_wire``: a plain map,
sent as msgpack through a pipe, never in argv, so credentials stay out of
``ps``), and the daemon rebuilds it (``from_wire``) and reads every setting
from it. ``BackendOptions`` is the part the blob backend sees; it is derived
from ``MountOptions``, never set on its own.

Kept free of trio, httpx and FUSE so that ``rafs mount`` and ``rafs run``
start quickly: they only spawn and talk to a daemon, which imports the heavy
parts itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .errors import MountError

__all__ = [
    "BLOB_MOUNT_OPTIONS",
    "DEFAULT_AMPLIFY",
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_READAHEAD_KB",
    "DEFAULT_RETRIES",
    "DEFAULT_STANDBY",
    "DEFAULT_SUPERVISE",
    "MODES",
    "MOUNT_OPTIONS",
    "BackendOptions",
    "MountOptions",
]

DEFAULT_AMPLIFY = 1 << 20  # an on-demand fetch grows to this many bytes of following chunks
DEFAULT_RETRIES = 4
DEFAULT_FETCH_TIMEOUT = 30.0  # seconds without a byte before a fetch counts as failed
DEFAULT_READAHEAD_KB = 1024  # the kernel's read-ahead on the mounts: one chunk (bench.readsim)
READAHEAD_ENV = "RAFS_READAHEAD_KB"  # a knob for studies of reads (bench.readtrace)
DEFAULT_MAX_REQUESTS = 8
READER_RETRY_AFTER_CAP = 10.0  # the longest Retry-After a reader's fetch honours (fused.fetcher)
ANSWER_GRACE = 5.0  # seconds a reader waits past the fetch deadline (fused.fetcher)
MODES = ("auto", "fuse", "kernel")
DEFAULT_SUPERVISE = True  # rafs mount, rafs run and the snapshotter (see the README)
DEFAULT_STANDBY = False  # a second, idle worker per supervised mount (README: its memory)

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


@dataclass(frozen=True)
class MountOptions:
    """Everything a daemon is told besides the image and the mount point."""

    cache_dir: str | None = None  # chunk cache (None: the host's, fused.cacheconf)
    mode: str = "auto"  # auto | fuse | kernel (see fused.kernelmount)
    prefetch: bool = True  # fetch the image's prefetch list in the background
    amplify_bytes: int = DEFAULT_AMPLIFY
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT  # idle seconds before a fetch is retried
    retries: int = DEFAULT_RETRIES  # per backend request, then EIO
    max_requests: int = DEFAULT_MAX_REQUESTS  # backend requests in flight
    readahead_kb: int = dataclasses.field(  # the kernel's read-ahead on the mount
        default_factory=lambda: int(os.environ.get(READAHEAD_ENV, DEFAULT_READAHEAD_KB)))
    metrics_address: str | None = None  # HOST:PORT for Prometheus over HTTP
    insecure: bool | None = None  # plain HTTP to the registry (None: localhost only)
    creds: tuple[str, str] | None = dataclasses.field(default=None, repr=False)
    hosts_dir: str | None = None  # registry mirrors, hosts.toml (None: rafs.hosts' default)
    cache_max: str | None = None  # over the host config's cache.max (fused.cacheconf)
    cache_min_free: str | None = None  # over its cache.min_free
    # -- a supervised mount (fused.supervisor): failover and hot upgrade
    supervise: bool = DEFAULT_SUPERVISE  # a supervisor owns the mount; workers serve it
    resend: bool = True  # False: as a kernel without FUSE_NOTIFY_RESEND (tests)
    standby: bool = DEFAULT_STANDBY  # keep a second worker ready to take over at once
    max_crashes: int = 5  # worker crashes within crash_window before giving up
    crash_window: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MountError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.fetch_timeout <= 0 or self.retries < 0:
            raise MountError("the fetch timeout must be positive and retries not negative")
        if self.amplify_bytes < 0 or self.max_requests < 1:
            raise MountError("amplify bytes must not be negative and max requests positive")
        if self.max_crashes < 1 or self.crash_window <= 0:
            raise MountError("max crashes and the crash window must be positive")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.path.abspath(self.cache_dir))

    def answer_bound(self) -> float:
        """The longest a read waits for its chunks before it is answered (an error at
        worst): ``fused.fetcher.Fetcher.answer_bound`` for these options. A supervisor
        replaces a worker that is stopped for longer."""
        from rafs.retry import RetryPolicy

        policy = RetryPolicy(retry_after_cap=READER_RETRY_AFTER_CAP, retries=self.retries)
        return policy.longest_wait(self.fetch_timeout) + ANSWER_GRACE

    def backend(self) -> BackendOptions:
        return BackendOptions(insecure=self.insecure, creds=self.creds,
                              timeout=self.fetch_timeout, max_connections=self.max_requests,
                              hosts_dir=self.hosts_dir)

    def to_wire(self) -> dict[str, Any]:
        """A plain map for ``fused.wire`` (credentials included: send it privately)."""
        out = dataclasses.asdict(self)
        if self.creds is not None:
            out["creds"] = list(self.creds)
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> MountOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MountError(f"unknown mount options {', '.join(sorted(unknown))}")
        values = dict(data)
        if values.get("creds") is not None:
            user, password = values["creds"]
            values["creds"] = (str(user), str(password))
        return cls(**values)
