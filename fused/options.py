"""What a mount can be told: the fetch defaults and the backend options.

Shared by the command line and the daemon, and kept free of trio, httpx and
FUSE so that `rafs mount` and `rafs run` start quickly: they only spawn and
talk to a daemon, which imports the heavy parts itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_AMPLIFY", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_RETRIES", "BackendOptions"]

DEFAULT_AMPLIFY = 1 << 20  # an on-demand fetch grows to this many bytes of following chunks
DEFAULT_RETRIES = 4
DEFAULT_FETCH_TIMEOUT = 30.0  # seconds without a byte before a fetch counts as failed


@dataclass(frozen=True)
class BackendOptions:
    """How to reach a remote image (ignored by local backends)."""

    insecure: bool | None = None  # None: plain HTTP for localhost only
    creds: tuple[str, str] | None = None
    timeout: float = 30.0
    max_connections: int = 8
    hosts_dir: str | None = None  # containerd's hosts.toml layout (None: rafs.hosts' default)
