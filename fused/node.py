"""The node service (``rafs daemon``): mounts start from a process that has imported everything.

A cold ``python -m fused.daemon`` spends 0.3-0.5 s starting the interpreter and
importing trio, pyfuse3, httpx and the daemon before it does anything for the
mount. The node service pays that once: it imports the daemon, the worker and
the supervisor, then waits on ``<run>/node.sock`` (``fused.runstate.run_dir``).
A mount request names ``fused.supervisor`` or ``fused.daemon`` and carries,
over SCM_RIGHTS, the read end of the caller's configuration pipe, the write
end of its readiness pipe and its log file; the service forks (it is
single-threaded and never runs trio, so the fork is clean), and the child, in
a session of its own with its output in the log, runs that module's ``main``
at once on those descriptors. The caller then writes the configuration and
waits on its pipe as it would for a spawned daemon (``fused.client.mount``
does both, and spawns when no service answers). A supervisor forked this way forks its
workers too (``fused.supervisor``), so a failover does not start an
interpreter either; ``rafs upgrade`` still starts a fresh one, for new code.

Children outlive the service: stopping or restarting it (SIGTERM) leaves every
mount served (a systemd unit needs ``KillMode=process``, see the README).

Protocol: one JSON line each way; commands ``ping`` (pid and version) and
``mount`` (``{"cmd": "mount", "module": "fused.supervisor", "argv": [...],
"env": {...}}`` with the three descriptors attached), answered with
``{"ok": true, "pid": CHILD}``. The configuration (credentials included) never
passes through the service: it goes from the caller to the child on the pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from .control import SUN_PATH_MAX
from .errors import ControlError, MountError
from .runstate import ensure_run_dir, run_dir

__all__ = ["MODULES", "main", "node_socket", "request_mount", "serve"]

log = logging.getLogger("fused.node")  # also when run as __main__

MODULES = ("fused.supervisor", "fused.daemon")
MAX_MESSAGE = 1 << 16
_ENV_ALLOWED = ("RAFS_RUN_DIR", "RAFS_HOSTS_DIR", "REGISTRY_AUTH_FILE",
                "DOCKER_CONFIG", "HOME")


def node_socket() -> Path:
    return run_dir() / "node.sock"


# -- client -------------------------------------------------------------------------


def request_mount(module: str, argv: list[str], env: dict[str, str], config_fd: int,
                  ready_fd: int, log_fd: int, timeout: float = 10.0) -> int | None:
    """Ask the node service to start ``module`` with ``argv``: the child's pid, or None
    when no service answers (the caller then spawns the process itself)."""
    path = node_socket()
    if not path.exists() or len(str(path)) > SUN_PATH_MAX:
        return None
    message = json.dumps({"cmd": "mount", "module": module, "argv": argv,
                          "env": env}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as e:
            log.warning("node service %s: %s; starting the daemon myself", path, e.strerror)
            return None
        try:
            socket.send_fds(s, [message], [config_fd, ready_fd, log_fd])
            reply = _read_line(s)
        except (OSError, ValueError) as e:
            raise ControlError(f"the node service did not answer: {e}") from None
    if not reply.get("ok"):
        raise MountError(f"the node service refused the mount: {reply.get('error')}")
    return int(reply["pid"])


def ping(path: Path | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    """The service's ``{"pid", "version"}``, None when none answers on ``path``."""
    path = node_socket() if path is None else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(b'{"cmd": "ping"}\n')
            return _read_line(s)
        except (OSError, ValueError):
            return None


def _read_line(s: socket.socket) -> dict[str, Any]:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        piece = s.recv(65536)
        if not piece:
            break
        buf += piece
        if len(buf) > MAX_MESSAGE:
            raise ValueError("reply too large")
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("malformed reply")
    return reply


# -- the service ----------------------------------------------------------------------


def preload() -> str:
    """Import everything a daemon or a worker needs; the version of that code."""
    from . import daemon, supervisor, worker  # noqa: F401  (trio, pyfuse3, httpx with them)
    from .backend import open_backend  # noqa: F401

    # Every process forked from the service sees it: supervisors then fork their workers.
    supervisor.preloaded_version = supervisor.code_version()
    return supervisor.preloaded_version


class _Stop(Exception):
    pass


def serve(path: Path) -> int:
    """Answer on ``path`` until SIGTERM or SIGINT; children are left running."""
    version = preload()
    ensure_run_dir()
    if path.exists() or path.is_symlink():
        if ping(path) is not None:
            raise MountError(f"a node service already answers on {path}")
        path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as e:
        raise MountError(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel

    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("node service %d (version %s) listening on %s", os.getpid(), version, path)
    try:
        while True:
            conn, _ = listener.accept()
            # No signal in the middle of a fork: a request is answered whole.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            try:
                with conn:
                    _session(conn, listener, version)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    except _Stop as e:
        log.info("got %s: stopping", e)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        log.info("node service stopped; its mounts keep running")
    return 0


def _session(conn: socket.socket, listener: socket.socket, version: str) -> None:
    conn.settimeout(10)
    fds: list[int] = []
    try:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
            buf = bytearray(data)
            while not buf.endswith(b"\n") and data:
                data = conn.recv(65536)
                buf += data
            message = json.loads(buf)
            cmd = message["cmd"]
        except (OSError, ValueError, KeyError, TypeError):
            reply: dict[str, Any] = {"ok": False, "error": "bad request"}
        else:
            if cmd == "ping":
                reply = {"ok": True, "pid": os.getpid(), "version": version}
            elif cmd == "mount":
                reply = _fork_mount(message, fds, listener, conn)
            else:
                reply = {"ok": False, "error": "bad request"}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _fork_mount(message: dict[str, Any], fds: list[int], listener: socket.socket,
                conn: socket.socket) -> dict[str, Any]:
    module, argv, env = message.get("module"), message.get("argv"), message.get("env") or {}
    if (module not in MODULES or not isinstance(argv, list) or len(fds) != 3
            or not all(isinstance(a, str) for a in argv) or not isinstance(env, dict)):
        return {"ok": False, "error": "bad mount request"}
    config_fd, ready_fd, log_fd = fds
    pid = os.fork()
    if pid:
        return {"ok": True, "pid": pid}
    # The child: never returns.
    code = 2
    try:
        listener.close()
        conn.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir("/")
        for key in _ENV_ALLOWED:
            os.environ.pop(key, None)
        os.environ.update({k: str(v) for k, v in env.items() if k in _ENV_ALLOWED})
        logging.root.handlers.clear()  # main() configures its own, on the new stderr
        sys.argv = [module, *argv]
        if module == "fused.supervisor":
            from .supervisor import main as entry
        else:
            from .daemon import main as entry
        code = entry(["--config-fd", str(config_fd), "--ready-fd", str(ready_fd), *argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        with contextlib.suppress(Exception):
            log.exception("forked %s failed", module)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused.node")
    p.add_argument("--socket", type=Path, help="default: <run dir>/node.sock")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return serve(args.socket or node_socket())


if __name__ == "__main__":
    # Run as fused.node, not as __main__, so that this process has one fused.node.
    from fused.node import main as node_main

    sys.exit(node_main())
