"""Concurrent readers that verify every byte they read, run as a separate process.

Owns: ``python -m tests.helpers.readers ROOT EXPECTED.json`` (a JSON object of
relative path → sha256) with N threads that each, until ``--stop-file``
appears or ``--seconds`` pass, pick a random file, read it whole
(``--direct``: with O_DIRECT), compare its sha256, then drop that file's
pages (``POSIX_FADV_DONTNEED``, per file: the next read of it reaches the
filesystem's daemon again; never a global drop).
Prints one JSON line: reads, bytes, errors (path and errno name of each, up to
50), mismatches, and ``answered`` — the monotonic times at which reads
completed, at most one per 5 ms, for measuring gaps.

``ReaderLoad`` starts it and collects the result; the test kills it if it
outlives its timeout, so a hung read fails the test instead of hanging it.
Independent of rafs on purpose.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReaderLoad", "ReaderResult"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class ReaderResult:
    reads: int
    bytes: int
    errors: list[dict[str, str]]
    error_count: int
    mismatches: list[str]
    answered: list[float] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReaderResult:
        return cls(data["reads"], data["bytes"], data["errors"], data["error_count"],
                   data["mismatches"], data.get("answered", []))


class ReaderLoad:
    """``with ReaderLoad(root, expected, threads=64) as load: ...; result = load.stop()``."""

    def __init__(self, root: Path, expected: dict[str, str], workdir: Path, *,
                 threads: int = 64, seconds: float = 600.0, direct: bool = False) -> None:
        self.root = root
        self.workdir = workdir
        self.expected_path = workdir / "expected.json"
        self.expected_path.write_text(json.dumps(expected))
        self.stop_file = workdir / "stop"
        self.stop_file.unlink(missing_ok=True)
        self.threads = threads
        self.seconds = seconds
        self.direct = direct
        self.proc: subprocess.Popen[str] | None = None
        self.result: ReaderResult | None = None

    def __enter__(self) -> ReaderLoad:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.readers", str(self.root),
             str(self.expected_path), "--threads", str(self.threads), "--seconds",
             str(self.seconds), "--stop-file", str(self.stop_file),
             *(["--direct"] if self.direct else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True)
        return self

    def stop(self, timeout: float = 120.0) -> ReaderResult:
        """Ask the readers to finish and return what they saw; AssertionError if a read
        hangs past ``timeout``."""
        assert self.proc is not None
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"readers hung for {timeout:g}s after stop\n{err[-2000:]}") \
                from None
        if self.proc.returncode != 0:
            raise AssertionError(f"readers exited {self.proc.returncode}\n{err[-2000:]}")
        self.result = ReaderResult.from_json(json.loads(out.strip().splitlines()[-1]))
        return self.result

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop_file.touch()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _read_all(path: str, direct: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                break
            h.update(piece)
            n += len(piece)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("expected")
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--stop-file")
    p.add_argument("--direct", action="store_true", help="O_DIRECT reads (no page cache)")
    args = p.parse_args(argv)
    expected: dict[str, str] = json.loads(Path(args.expected).read_text())
    names = sorted(expected)
    lock = threading.Lock()
    totals = {"reads": 0, "bytes": 0, "error_count": 0}
    errors: list[dict[str, str]] = []
    mismatches: list[str] = []
    answered: list[float] = []
    deadline = time.monotonic() + args.seconds
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set() and time.monotonic() < deadline:
            rel = rng.choice(names)
            try:
                digest, n = _read_all(os.path.join(args.root, rel), args.direct)
            except OSError as e:
                with lock:
                    totals["error_count"] += 1
                    if len(errors) < 50:
                        errors.append({"path": rel, "errno": errno.errorcode.get(e.errno or 0,
                                                                                 str(e.errno)),
                                       "at": f"{time.monotonic():.3f}"})
                continue
            now = time.monotonic()
            with lock:
                totals["reads"] += 1
                totals["bytes"] += n
                if digest != expected[rel] and len(mismatches) < 50:
                    mismatches.append(rel)
                if not answered or now - answered[-1] >= 0.005:
                    answered.append(round(now, 4))

    threads = [threading.Thread(target=reader, args=(i,), daemon=True)
               for i in range(args.threads)]
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({**totals, "errors": errors, "mismatches": mismatches,
                      "answered": answered}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
