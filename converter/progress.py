"""A one-line progress display on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Progress:
    """Counts bytes of input; redraws at most ten times a second."""

    def __init__(self, total: int | None, label: str = "converting",
                 enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def note(self, label: str) -> None:
        self.label = label
        if self.enabled:
            self._draw(time.monotonic())

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-6)
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            text = f"{self.label}: {_mib(self.done)} / {_mib(self.total)} ({pct:.0f}%)"
        else:
            text = f"{self.label}: {_mib(self.done)}"
        self.stream.write(f"\r\x1b[K{text}, {_mib(rate)}/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
