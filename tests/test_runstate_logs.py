"""The daemons' logs do not pile up: a failed mount keeps its log (its error names it),
a clean exit keeps none, and ``runstate.prune`` keeps only the newest of the daemons
that are gone, never a live one's.

Pure: a private ``$RAFS_RUN_DIR`` with real files and a real flock for the live
instance; no FUSE, no root.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from fused import runstate


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "run"
    monkeypatch.setenv("RAFS_RUN_DIR", str(base))
    runstate.ensure_run_dir()
    return base


def _log(base: Path, instance_id: str, mtime: float) -> Path:
    path = base / "logs" / f"{instance_id}.log"
    path.write_text("2026-01-01 00:00:00,000 1 fused.daemon ERROR it failed\n")
    os.utime(path, (mtime, mtime))
    return path


def test_prune_keeps_the_newest_logs_of_gone_daemons_and_every_live_one(run: Path) -> None:
    gone = [_log(run, f"{i:016x}-0000000{i % 10}", 1_000_000 + i) for i in range(10)]
    live = runstate.OwnedInstance.create("f" * 16 + "-12345678")
    try:
        live_log = _log(run, live.instance.id, 1.0)  # the oldest of all
        runstate.prune(keep_logs=3)
        left = sorted(p.name for p in (run / "logs").iterdir())
        assert left == sorted([live_log.name, *(p.name for p in gone[-3:])])
    finally:
        live.close()
    runstate.prune(keep_logs=3)  # now gone too: the oldest, so it goes
    assert not live_log.exists()
    assert len(list((run / "logs").iterdir())) == 3


def test_prune_by_default_bounds_the_logs(run: Path) -> None:
    for i in range(runstate.KEEP_LOGS + 5):
        _log(run, f"{i:016x}-00000000", 1_000_000 + i)
    runstate.prune()
    assert len(list((run / "logs").iterdir())) == runstate.KEEP_LOGS


def test_a_log_whose_instance_is_locked_elsewhere_stays(run: Path) -> None:
    """Liveness is the lock, not a pid: a log stays while anyone holds its lock."""
    inst = runstate.instance("a" * 16 + "-87654321")
    inst.dir.mkdir(parents=True)
    fd = os.open(inst.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        kept = _log(run, inst.id, 1.0)
        for i in range(5):
            _log(run, f"{i:016x}-00000000", 1_000_000 + i)
        runstate.prune(keep_logs=1)
        assert kept.exists()
        assert len(list((run / "logs").iterdir())) == 2
    finally:
        os.close(fd)
