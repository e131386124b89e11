"""``rafs ps`` and ``rafs rm``: list containers and remove them.

A container's live status comes from runc (``running`` with the init pid) or,
when runc no longer knows it, from its record: ``exited (N)``, or ``dead`` if
the ``rafs run`` that owned it vanished without recording an exit (SIGKILL).

``rm`` refuses a running container without ``-f``; with ``-f`` it kills it.
When the owning ``rafs run`` is alive it cleans up after the container itself,
so ``rm`` waits for that; otherwise ``rm`` undoes what is left: runc's state,
the overlay, the container's use of the shared image mount, the directory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from fused.runstate import pid_alive

from . import imagemount, overlay, store
from .errors import ContainerRunningError, RunError
from .runc import Runc

__all__ = ["Row", "list_rows", "remove"]

log = logging.getLogger(__name__)


@dataclass
class Row:
    name: str
    id: str
    image: str
    status: str
    pid: int | None
    created: float
    digest: str = ""  # the image's manifest digest
    lazy: bool = False  # a RAFS image on the shared lazy mount (else unpacked)
    exit_code: int | None = None

    def to_json(self) -> dict[str, object]:
        """What ``rafs ps --json`` prints of the container."""
        return {"name": self.name, "id": self.id, "image": self.image, "digest": self.digest,
                "status": self.status, "exit_code": self.exit_code, "pid": self.pid,
                "lazy": self.lazy, "created": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))}


def _owner_alive(c: store.Container) -> bool:
    return pid_alive(c.owner_pid)


def _status(c: store.Container, runc: Runc | None) -> tuple[str, int | None]:
    state = runc.state(c.id) if runc is not None else None
    if state is not None:
        pid = state.get("pid")
        return str(state.get("status", "unknown")), pid if isinstance(pid, int) else None
    if c.status == "exited":
        return f"exited ({c.exit_code})" if c.exit_code is not None else "exited", None
    if _owner_alive(c):
        return c.status, None  # still being set up (or torn down)
    return "dead", None


def _runc_or_none() -> Runc | None:
    try:
        return Runc()
    except RunError:
        return None


def list_rows() -> list[Row]:
    runc = _runc_or_none()
    rows = []
    for c in store.list_all():
        status, pid = _status(c, runc)
        rows.append(Row(c.name, c.id, c.image, status, pid, c.created, c.digest, c.lazy,
                        c.exit_code))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("NAME", "CONTAINER ID", "IMAGE", "STATUS", "PID", "CREATED")
    lines = [header]
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        lines.append((r.name, r.id[:12], r.image, r.status,
                      str(r.pid) if r.pid else "-", created))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(f.ljust(w) for f, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def remove(name: str, force: bool, timeout: float = 30.0) -> str:
    """Remove one container; return its name."""
    c = store.find(name)
    runc = _runc_or_none()
    status, _ = _status(c, runc)
    known_to_runc = runc is not None and runc.state(c.id) is not None
    active = known_to_runc or (not status.startswith(("exited", "dead")) and _owner_alive(c))
    if active and not force:
        raise ContainerRunningError(f"container {c.name} is {status}: stop it first or "
                                    "use `rafs rm -f`")
    if runc is not None and runc.state(c.id) is not None:
        runc.kill(c.id, "KILL")
    if _owner_alive(c) and c.owner_pid != os.getpid():
        deadline = time.monotonic() + timeout
        while _owner_alive(c) and time.monotonic() < deadline:
            time.sleep(0.05)  # the owning `rafs run` cleans up and exits
    if runc is not None and runc.state(c.id) is not None:
        runc.delete(c.id)
    overlay.unmount(c.rootfs)
    if c.lazy:
        imagemount.release(c.digest.removeprefix("sha256:"), c.id)
    store.remove_dir(c)
    return c.name
