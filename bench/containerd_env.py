"""A private containerd and the rafs snapshotter it talks to, for tests and benchmarks;
both always stopped.

Owns:

- ``snapshotter_process`` — ``rafs snapshotter --address SOCK --root DIR`` in a
  subprocess, ready once its socket accepts connections; stopped with SIGTERM
  (then SIGKILL) in ``finally``, or ``kill``ed on purpose. It does not unmount
  its rafs mounts (they outlive it on purpose); ``unmount_under`` does that at
  the end of a test module.
- ``containerd_daemon`` — Debian's containerd with root, state, sockets and a
  generated ``config.toml`` under a temp dir, CRI disabled, and
  ``[proxy_plugins.rafs]`` pointing at the snapshotter. With ``cri=CriSettings(...)``
  the CRI plugin is enabled instead (``cri_config``): it pulls and unpacks
  through the rafs snapshotter with snapshot annotations on, takes the given
  ``sandbox_image``, reads CNI config only from empty private dirs (pods use
  the host network) and serves streaming on 127.0.0.1 at a free port. In ``finally``: every
  task is killed and deleted, shims still alive (found by their ``-address``
  argument) are killed with their children, containerd is stopped, and every
  mount under its directory is unmounted.
- ``Containerd.ctr`` / ``ctr_remote`` — run ``ctr`` / ``ctr-remote`` against
  it, in a private namespace; ``kill`` (SIGKILL: what a crash does, its shims
  live on), ``start`` (again, on the same state) and ``wipe`` (kill it and its
  shims, undo their mounts, remove its root and state: a node whose containerd
  lost everything) for tests that break it on purpose.

It drives the command line exactly as a user would, except for teardown,
which calls ``fused.client`` (the API every rafs component tears mounts down
with). ``tests.helpers.containerd`` re-exports it for tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RAFS_FSTYPES",
    "Containerd",
    "CriSettings",
    "SnapshotterProcess",
    "containerd_daemon",
    "cri_config",
    "mounts_under",
    "rafs_cmd",
    "run",
    "snapshotter_process",
    "stop_process",
    "unmount_under",
    "wait_for_path",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def rafs_cmd(*args: str | os.PathLike[str]) -> list[str]:
    """argv running the ``rafs`` CLI of this checkout with the current interpreter."""
    return [sys.executable, "-m", "runtime.cli", *(os.fspath(a) for a in args)]


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}


def run(cmd: list[str], *, timeout: float = 300, check: bool = False,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing text output; on timeout its process group is killed."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{out}\n"
                           f"stderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


RAFS_FSTYPES = ("fuse.rafs", "erofs")

CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "info"

[proxy_plugins.rafs]
  type = "snapshot"
  address = "{snapshotter}"
"""

PROXY_PLUGIN = """
[proxy_plugins.{name}]
  type = "snapshot"
  address = "{address}"
"""


@dataclass(frozen=True)
class CriSettings:
    """What the CRI variant of the containerd fixture needs: the pause image to run
    sandboxes from (``HOST/REPO:TAG``, pulled through CRI on first use)."""

    sandbox_image: str
    snapshotter: str = "rafs"


# The CRI plugin's part of config.toml (containerd 1.6, config version 2): the
# configuration the README's Kubernetes section shows, on private directories
# (runc's state too). restrict_oom_score_adj: the test machine's root lacks
# CAP_SYS_RESOURCE, so runc could not give the sandbox the -998 OOM score CRI
# asks for; this clamps it to containerd's own (a node does not need it).
CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/net.d"
"""


def cri_config(base: Path, address: Path, snapshotter_address: Path,
               cri: CriSettings) -> str:
    """config.toml for a containerd under ``base`` with the CRI plugin enabled."""
    (base / "cni" / "bin").mkdir(parents=True, exist_ok=True)
    (base / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    plain = CONFIG.format(root=base / "root", state=base / "state", address=address,
                          snapshotter=snapshotter_address)
    plain = plain.replace('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n', "")
    return plain + CRI_CONFIG.format(sandbox_image=cri.sandbox_image,
                                     snapshotter=cri.snapshotter, cni=base / "cni",
                                     runc_root=base / "runc")


def mounts_under(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mp = _unescape(left.split()[4])
        if mp == base or mp.startswith(base + "/"):
            out.append((mp, right.split()[0] if right else ""))
    return sorted(out, key=lambda m: m[0].count("/"), reverse=True)


def unmount_under(path: str | os.PathLike[str]) -> None:
    """Unmount everything below ``path``: rafs mounts (FUSE, or EROFS in kernel mode)
    through ``fused.client`` (plainly, then by force), which also ends their daemons
    and blob mounts; the rest (overlay, bind) with ``umount -l``; nothing is left
    mounted."""
    from fused import client

    with contextlib.suppress(Exception):
        if client.unmount_all(under=path):
            client.unmount_all(under=path, force=True)
    for mp, fstype in mounts_under(path):
        cmd = ["fusermount3", "-u", "-z", mp] if fstype.startswith("fuse") else \
            ["umount", "-l", mp]
        subprocess.run(cmd, check=False, capture_output=True)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], timeout: float, what: str,
                  log: Path) -> None:
    """Wait until the unix socket ``path`` of a daemon accepts connections (a stale file
    left by a killed one does not count); raise with the log tail if the daemon exits
    or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start in {timeout}s:\n"
                                 f"{log.read_text()[-4000:]}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM, ``grace`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class SnapshotterProcess:
    """``rafs -vv snapshotter`` in a subprocess; ``stop``/``start`` restart it on the
    same root, ``kill`` SIGKILLs it. Its rafs mounts outlive it on purpose
    (``unmount_under`` ends them)."""

    def __init__(self, address: Path, root: Path, log: Path, extra: tuple[str, ...] = ()):
        self.address, self.root, self.log, self.extra = address, root, log, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                rafs_cmd("-vv", "snapshotter", "--address", self.address, "--root", self.root,
                         "--cache-dir", self.root / "cache",  # private: never the host's
                         *self.extra),
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                env=_env(),
            )
        wait_for_path(self.address, self.proc, 60, "rafs snapshotter", self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def snapshotter_process(address: Path, root: Path, log: Path,
                        extra: tuple[str, ...] = ()) -> Iterator[SnapshotterProcess]:
    """The snapshotter running until the block ends (its mounts stay)."""
    sp = SnapshotterProcess(address, root, log, extra)
    try:
        sp.start()
        yield sp
    finally:
        sp.stop()


@dataclass
class Containerd:
    dir: Path
    address: Path
    namespace: str
    proc: subprocess.Popen[bytes] | None
    log: Path

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.dir / "config.toml")],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)
        wait_for_path(self.address, self.proc, 60, "containerd", self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wipe(self) -> None:
        self.kill()
        _kill_shims(self.address)
        for sub in ("root", "state"):
            for mp, fstype in mounts_under(self.dir / sub):
                cmd = ["umount", "-l", mp] if not fstype.startswith("fuse") else \
                    ["fusermount3", "-u", "-z", mp]
                subprocess.run(cmd, check=False, capture_output=True)
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir / sub)], check=False)

    def ctr(self, *args: str, timeout: float = 300, check: bool = True,
            tool: str = "ctr") -> subprocess.CompletedProcess[str]:
        return run([tool, "--address", str(self.address), "--namespace", self.namespace,
                    *args], timeout=timeout, check=check)

    def ctr_remote(self, *args: str, timeout: float = 300,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr(*args, timeout=timeout, check=check, tool="ctr-remote")


def _pids_with_arg(arg: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in cmdline:
            out.append(int(d.name))
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _kill_shims(address: Path) -> None:
    for shim in _pids_with_arg(str(address)):
        for pid in [*_descendants(shim), shim]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def containerd_daemon(base: Path, snapshotter_address: Path,
                      namespace: str = "rafs-test",
                      cri: CriSettings | None = None,
                      proxies: dict[str, Path] | None = None) -> Iterator[Containerd]:
    """A private containerd under ``base`` using the rafs snapshotter at
    ``snapshotter_address``; with ``cri``, its CRI plugin serves on the same socket
    (use namespace ``k8s.io``, CRI's own, so that ``ctr`` and the teardown see the
    pods' tasks); ``proxies`` adds further proxy snapshotters (name -> socket), e.g.
    the eStargz peer of ``bench.peers``."""
    base.mkdir(parents=True, exist_ok=True)
    address = base / "containerd.sock"
    config = base / "config.toml"
    if cri is not None:
        text = cri_config(base, address, snapshotter_address, cri)
    else:
        text = CONFIG.format(root=base / "root", state=base / "state", address=address,
                             snapshotter=snapshotter_address)
    for name, sock in (proxies or {}).items():
        text += PROXY_PLUGIN.format(name=name, address=sock)
    config.write_text(text)
    cd = Containerd(base, address, namespace, None, base / "containerd.log")
    try:
        cd.start()
        yield cd
    finally:
        with contextlib.suppress(Exception):
            if cd.proc is not None and cd.proc.poll() is None:
                tasks = cd.ctr("task", "ls", "-q", check=False, timeout=30).stdout.split()
                for task in tasks:
                    cd.ctr("task", "kill", "-s", "KILL", task, check=False, timeout=30)
                for task in tasks:
                    cd.ctr("task", "rm", "-f", task, check=False, timeout=30)
        _kill_shims(address)
        if cd.proc is not None:
            stop_process(cd.proc)
        _kill_shims(address)
        unmount_under(base)
