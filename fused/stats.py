"""The daemon's counters: one ``Stats`` object per mount, bumped in place.

Counters are plain ints mutated from the trio thread only (worker threads hand
their results back before anything is counted), so no locking is needed.
``snapshot()`` is the JSON the control socket serves; ``prometheus()`` the same
numbers in the Prometheus text exposition format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

__all__ = ["Stats"]

_HELP = {
    "read_requests": "read requests served to users",
    "read_bytes": "bytes returned to users by read requests",
    "cache_hits": "chunks a read found in the local cache",
    "cache_misses": "chunks a read had to fetch (or wait for)",
    "cache_corrupt": "cached chunks whose xxh3 did not match and were refetched",
    "backend_requests": "requests made to the blob backend",
    "backend_bytes": "compressed bytes fetched from the backend",
    "backend_chunks": "chunks fetched from the backend",
    "backend_errors": "backend requests that failed (each retry counts)",
    "prefetch_chunks": "chunks fetched ahead of readers by the prefetch list",
    "digest_failures": "fetched chunks whose sha256 did not match",
    "errors": "read requests answered with an error",
}


@dataclass(slots=True)
class Stats:
    """Counters of one mount; every field is monotonic."""

    read_requests: int = 0
    read_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_corrupt: int = 0
    backend_requests: int = 0
    backend_bytes: int = 0
    backend_chunks: int = 0
    backend_errors: int = 0
    prefetch_chunks: int = 0
    digest_failures: int = 0
    errors: int = 0
    started: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, int | float]:
        """A JSON-serialisable copy of every counter, plus uptime in seconds."""
        out: dict[str, int | float] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "started"
        }
        out["uptime"] = round(time.time() - self.started, 3)
        return out

    def prometheus(self, labels: dict[str, str] | None = None) -> str:
        """The counters in the Prometheus text format, names prefixed ``rafs_``."""
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"
        lines = []
        for name, value in self.snapshot().items():
            metric = f"rafs_{name}" if name == "uptime" else f"rafs_{name}_total"
            kind = "gauge" if name == "uptime" else "counter"
            lines.append(f"# HELP {metric} {_HELP.get(name, 'seconds since the daemon started')}")
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric}{lab} {value}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
