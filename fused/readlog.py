"""An opt-in debug log of every read the daemon serves, for recording workloads.

Set ``RAFS_READ_LOG=PATH`` in the daemon's environment (``rafs mount``,
``rafs run`` and the snapshotter pass their environment on) and each read
request is appended to ``PATH`` as one JSON line, in the order the daemon
receives them:

- fuse mode: ``{"t": SECONDS, "nid": NID, "off": OFFSET, "len": LENGTH}``, a
  read of the file with EROFS nid ``NID`` at a file offset;
- kernel mode: ``{"t": SECONDS, "blob": K, "off": OFFSET, "len": LENGTH}``, a
  read of blob ``K``'s uncompressed address space (what the kernel's EROFS
  mount asks the blob files for).

``t`` is seconds since the log was opened. This is a tool for building and
checking the read-ahead policy (``bench.readtrace`` records workloads with it,
``fused.readahead`` is tested on what it recorded); it is not the access trace
of ``rafs trace`` (``fused.trace``), which keeps first accesses for prefetch
lists. Off by default, and then it costs one attribute test per read.
"""

from __future__ import annotations

import json
import os
import time
from typing import TextIO

__all__ = ["ENV", "ReadLog"]

ENV = "RAFS_READ_LOG"


class ReadLog:
    """Appends one JSON line per read to a file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: TextIO = open(path, "a", encoding="ascii", buffering=1)  # noqa: SIM115
        self._t0 = time.monotonic()

    @classmethod
    def from_env(cls) -> ReadLog | None:
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def file_read(self, nid: int, offset: int, size: int) -> None:
        self._write({"nid": nid, "off": offset, "len": size})

    def blob_read(self, blob: int, offset: int, size: int) -> None:
        self._write({"blob": blob, "off": offset, "len": size})

    def _write(self, record: dict[str, int]) -> None:
        record = {"t": round(time.monotonic() - self._t0, 6), **record}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
