"""Mount an image with ``rafs mount`` for the length of a ``with`` block, and never leak it.

Owns: ``mounted`` (mount through the real CLI in a subprocess, yield the mount
point, and in ``finally`` always unmount: ``rafs umount``, then
``rafs umount --force``, then ``umount -l`` / ``fusermount3 -u -z`` of whatever
is left, kernel mode's blob mount included, then SIGKILL for a daemon that is
still alive), ``is_mounted``,
``fuse_mounts`` and ``rafs_mounts`` (read ``/proc/self/mountinfo``, for
asserting that nothing leaked).

``mounted`` mounts in fuse mode unless told otherwise (``mode="kernel"`` or
``mode="auto"``): most tests prove what the FUSE daemon itself shows.

Like the other helpers it does not import rafs, converter or fused: it drives
the command line exactly as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.helpers.procs import run

__all__ = ["daemon_pids", "fuse_mounts", "is_mounted", "mounted", "rafs_cmd", "rafs_mounts",
           "read_stats"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def rafs_cmd(*args: str | os.PathLike[str]) -> list[str]:
    """argv running the ``rafs`` CLI of this checkout with the current interpreter."""
    return [sys.executable, "-m", "runtime.cli", *(os.fspath(a) for a in args)]


def daemon_pids(under: str | os.PathLike[str]) -> list[int]:
    """Every rafs process serving a mount point below ``under``: plain daemons,
    supervisors and their workers (each names its mount point in argv)."""
    res = subprocess.run(["pgrep", "-f", f"fused[.](daemon|supervisor|worker) .* {under}/"],
                         capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split()]


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, **(extra or {})}


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(wanted: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype.startswith(wanted):
            out[_unescape(left.split()[4])] = fstype
    return out


def fuse_mounts() -> dict[str, str]:
    """{mount point: fs type} of every FUSE mount this process can see."""
    return _mounts(("fuse",))


def rafs_mounts() -> dict[str, str]:
    """{mount point: fs type} of every FUSE and EROFS mount (both rafs modes)."""
    return _mounts(("fuse", "erofs"))


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return os.path.realpath(mountpoint) in rafs_mounts()


def _force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Detach whatever rafs left on ``mountpoint`` (EROFS first, then FUSE below it)."""
    mp = os.path.realpath(mountpoint)
    for _ in range(3):
        fstype = rafs_mounts().get(mp)
        if fstype is None:
            return
        if fstype == "erofs":
            subprocess.run(["umount", "-l", mp], check=False)
        else:
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False)


def blob_mounts(run_dir: str | None = None) -> list[str]:
    """Kernel mode's blob filesystems (``fuse.rafs-blobs``) still mounted; with
    ``run_dir``, only those below it (other processes' daemons are not ours)."""
    return [mp for mp, t in fuse_mounts().items() if t == "fuse.rafs-blobs"
            and (run_dir is None or mp.startswith(run_dir.rstrip("/") + "/"))]


def read_stats(
    mountpoint: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> dict[str, object]:
    """The ``rafs stats`` JSON of a mount (the reply: pid, image, ``stats`` counters...)."""
    res = run(rafs_cmd("stats", mountpoint), env=_env(env), timeout=60, check=True)
    return json.loads(res.stdout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def mounted(
    image_ref: str,
    mountpoint: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 180,
    mode: str = "fuse",
) -> Iterator[Path]:
    """Mount ``image_ref`` on ``mountpoint`` with ``rafs mount``; unmount whatever happens.

    ``env`` is added to the environment of every ``rafs`` command (for example
    ``RAFS_RUN_DIR``). Fails the test with the CLI's stderr if the mount fails.
    """
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    # The daemons of other tests and benchmarks on this machine have other run
    # directories: never clean up their blob mounts.
    run_dir = {**os.environ, **(env or {})}.get("RAFS_RUN_DIR")
    blobs_before = set(blob_mounts(run_dir))
    res = run(
        rafs_cmd("mount", image_ref, mp, "--cache-dir", cache_dir, "--mode", mode, *extra_args),
        env=_env(env), timeout=timeout,
    )
    if res.returncode != 0:
        _force_unmount(mp)  # the CLI must never leave one behind; clean up anyway
        raise AssertionError(
            f"rafs mount {image_ref} {mp} exited {res.returncode}\nstderr:\n{res.stderr}"
        )
    pids: set[int] = set()  # the worker and its supervisor (one process if plain)
    try:
        with contextlib.suppress(Exception):
            stats = read_stats(mp, env)
            pids = {int(stats[k]) for k in ("pid", "owner_pid")  # type: ignore[call-overload]
                    if k in stats}
        yield mp
    finally:
        with contextlib.suppress(Exception):
            if run(rafs_cmd("umount", mp), env=_env(env), timeout=90).returncode != 0:
                run(rafs_cmd("umount", "--force", mp), env=_env(env), timeout=90)
        _force_unmount(mp)
        for leftover in set(blob_mounts(run_dir)) - blobs_before:
            subprocess.run(["fusermount3", "-u", "-z", leftover], check=False)
        deadline = time.monotonic() + 10
        for pid in pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
