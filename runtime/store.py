"""The containers this host knows: one directory each, with a ``state.json``.

``state.json`` holds what ``rafs ps`` shows and what ``rafs rm`` needs to undo:
id, name, image reference and manifest digest, whether the image is mounted
lazily (the shared image mount to release) or unpacked, the pid of the
``rafs run`` that owns the container, its creation time, its status
(``created``, ``running``, ``exited``) and exit code. Names are unique; a
lock on the containers directory makes "check the name, create the
directory" atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ContainerExistsError, ContainerNotFoundError, RunError
from .paths import containers_dir

__all__ = ["Container", "create", "find", "list_all", "locked"]

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


@dataclass
class Container:
    id: str
    name: str
    image: str
    digest: str
    lazy: bool  # True: holds a user of the shared image mount
    owner_pid: int
    created: float
    status: str = "created"  # created | running | exited
    exit_code: int | None = None
    keep_mounted: bool = False

    @property
    def dir(self) -> Path:
        return containers_dir() / self.id

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    def save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.dir / "state.json")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """The containers lock: no container record is created while it is held."""
    base = containers_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(base / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(path: Path) -> Container | None:
    try:
        value = json.loads((path / "state.json").read_text())
        return Container(**value)
    except (OSError, ValueError, TypeError):
        return None


def list_all() -> list[Container]:
    try:
        entries = sorted(containers_dir().iterdir())
    except FileNotFoundError:
        return []
    out = [c for p in entries if p.is_dir() and (c := _load(p)) is not None]
    out.sort(key=lambda c: c.created)
    return out


def find(name_or_id: str) -> Container:
    """The container named ``name_or_id``, or whose id starts with it (unambiguously)."""
    containers = list_all()
    for c in containers:
        if c.name == name_or_id or c.id == name_or_id:
            return c
    matches = [c for c in containers if len(name_or_id) >= 4 and c.id.startswith(name_or_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ContainerNotFoundError(f"{name_or_id!r} names {len(matches)} containers")
    raise ContainerNotFoundError(f"no such container: {name_or_id}")


def create(name: str | None, image: str, digest: str, lazy: bool,
           keep_mounted: bool = False) -> Container:
    """A new container record with its directory; ContainerExistsError if the name is taken."""
    if name is not None and not _NAME.fullmatch(name):
        raise RunError(f"bad container name {name!r} (letters, digits, '_', '.', '-')")
    cid = secrets.token_hex(32)
    with locked():
        taken = {c.name for c in list_all()}
        if name is None:
            name = f"rafs-{cid[:8]}"
        if name in taken:
            raise ContainerExistsError(f"the name {name!r} is in use (`rafs rm {name}`)")
        c = Container(cid, name, image, digest, lazy, os.getpid(), time.time(),
                      keep_mounted=keep_mounted)
        c.dir.mkdir(mode=0o711)
        c.save()
    return c


def remove_dir(c: Container) -> None:
    shutil.rmtree(c.dir, ignore_errors=True)
