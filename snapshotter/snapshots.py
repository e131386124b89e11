"""The snapshotter itself: containerd's overlayfs snapshotter semantics plus RAFS layers.

Layout under the root::

    metadata.db           snapshot metadata (``snapshotter.store``)
    snapshots/ID/fs       a snapshot's files: the upper dir of an active
                          snapshot, the lower dir once committed; for the
                          bootstrap layer of a RAFS image, the rafs mount point
    snapshots/ID/work     overlayfs work dir of an active snapshot
    cache/                the fused chunk cache shared by every RAFS mount

Mounts handed out, as containerd's overlayfs snapshotter hands them out:

- active, no parent: ``bind`` of its fs dir, rw; view, no parent: the same, ro;
- view with one lower: ``bind`` of that lower, ro;
- otherwise ``overlay`` with ``lowerdir`` = the parents' fs dirs, nearest
  first, and for an active snapshot ``upperdir``/``workdir`` of its own.

RAFS layers: ``Prepare`` whose labels name a layer of a RAFS image (see
``snapshotter.labels``) creates the committed snapshot at once and answers
AlreadyExists, so containerd downloads and applies nothing. Blob layers are
empty snapshots; the image's bootstrap layer is mounted through fused on its fs
dir, and that mount holds the whole image tree: the lowers of a child stop
there (the empty blob snapshots below it are left out). A mount that is
gone (daemon killed, host rebooted) is mounted again when a child needs it.
Removing the bootstrap snapshot unmounts it; ``Cleanup`` removes directories
(and unmounts mounts) that no snapshot owns any more. The fused daemons run in
their own sessions, so they, and the containers on them, outlive a restart of
the snapshotter.

Locking: one lock around every call; the metadata store is not thread-safe on
its own and containerd's calls are short, except a first RAFS mount.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    SnapshotterError,
)
from .filters import matcher, snapshot_fields
from .labels import LABEL_RAFS_IMAGE, LABEL_RAFS_ROLE, RemoteRequest, remote_request
from .store import Kind, MetaStore, Snapshot

__all__ = ["Mount", "RemoteLayer", "RemoteLayers", "Snapshotter", "disk_usage"]

log = logging.getLogger(__name__)

ROLE_BOOTSTRAP = "bootstrap"
ROLE_BLOB = "blob"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class RemoteLayer:
    """A layer of a RAFS image, as ``RemoteLayers.identify`` found it."""

    image: str  # docker://HOST/REPO@sha256:... (pinned by manifest digest)
    role: str  # ROLE_BOOTSTRAP or ROLE_BLOB


class RemoteLayers(Protocol):
    """What the snapshotter needs from the RAFS side (``snapshotter.remote``)."""

    def identify(self, request: RemoteRequest) -> RemoteLayer | None: ...

    def mount(self, image: str, mountpoint: Path) -> None: ...

    def is_mounted(self, mountpoint: Path) -> bool: ...

    def is_serving(self, mountpoint: Path) -> bool: ...

    def unmount(self, mountpoint: Path) -> None: ...


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under ``path``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            continue
        seen.add(ident)
        inodes += 1
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                stack.extend(Path(e.path) for e in it)
    return size, inodes


class Snapshotter:
    """containerd snapshot operations over one root directory."""

    def __init__(self, root: str | Path, remote: RemoteLayers | None = None) -> None:
        self.root = Path(root).resolve()
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.store = MetaStore(self.root / "metadata.db")
        self.remote = remote
        self._lock = threading.RLock()

    def close(self) -> None:
        self.store.close()

    # -- paths ------------------------------------------------------------------

    def _dir(self, snap: Snapshot) -> Path:
        return self.root / "snapshots" / str(snap.id)

    def fs_dir(self, snap: Snapshot) -> Path:
        return self._dir(snap) / "fs"

    # -- the API ----------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        with self._lock:
            request = remote_request(labels) if self.remote is not None else None
            if request is not None:
                self._prepare_remote(key, parent, dict(labels), request)
            return self._create(key, parent, Kind.ACTIVE, dict(labels))

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        with self._lock:
            return self._create(key, parent, Kind.VIEW, dict(labels))

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            snap = self.store.get(key)
            if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPreconditionError(f"snapshot {key} is not active or a view")
            return self._mounts(snap)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        with self._lock:
            snap = self.store.get(key)
            size, inodes = (disk_usage(self.fs_dir(snap)) if snap.kind == Kind.ACTIVE
                            else (0, 0))
            return self.store.commit(key, name, dict(labels), size, inodes)

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self.store.remove(key)
            self._remove_dir(self._dir(snap))

    def stat(self, key: str) -> Snapshot:
        with self._lock:
            return self.store.get(key)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        """Change labels: every path ``labels`` or ``labels.KEY``; no paths: all labels."""
        with self._lock:
            snap = self.store.get(name)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise InvalidArgumentError(f"cannot update field {path!r} of a snapshot")
            return self.store.set_labels(name, new)

    def usage(self, key: str) -> tuple[int, int]:
        with self._lock:
            snap = self.store.get(key)
            if snap.kind == Kind.ACTIVE:
                return disk_usage(self.fs_dir(snap))
            return snap.size, snap.inodes

    def walk(self, filters: Sequence[str] = ()) -> list[Snapshot]:
        match = matcher(filters)
        with self._lock:
            snaps = self.store.walk()
        return [s for s in snaps
                if match(snapshot_fields(s.key, s.parent, s.kind.name.lower(), s.labels))]

    def cleanup(self) -> None:
        """Remove the directories (and unmount the mounts) no snapshot owns any more."""
        with self._lock:
            ids = self.store.ids()
            for entry in sorted((self.root / "snapshots").iterdir()):
                if entry.name.isdigit() and int(entry.name) in ids:
                    continue
                log.info("cleanup: removing %s", entry)
                self._remove_dir(entry)

    # -- internals --------------------------------------------------------------

    def _create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> list[Mount]:
        snap = self.store.create(key, parent, kind, labels)
        try:
            d = self._dir(snap)
            (d / "fs").mkdir(parents=True, mode=0o755)
            if kind == Kind.ACTIVE:
                (d / "work").mkdir(mode=0o711)
            return self._mounts(snap)
        except BaseException:
            self.store.remove(key)
            self._remove_dir(self._dir(snap))
            raise

    def _prepare_remote(
        self, key: str, parent: str, labels: dict[str, str], request: RemoteRequest
    ) -> None:
        """Create the committed snapshot of a RAFS layer and raise AlreadyExists;
        return (to prepare an ordinary snapshot) when the layer is not RAFS."""
        assert self.remote is not None
        if self.store.find(request.target) is not None:
            raise AlreadyExistsError(f"target snapshot {request.target} already exists")
        layer = self.remote.identify(request)
        if layer is None:
            return
        labels = {**labels, LABEL_RAFS_IMAGE: layer.image, LABEL_RAFS_ROLE: layer.role}
        snap = self.store.create(request.target, parent, Kind.COMMITTED, labels,
                                 remote={"image": layer.image, "role": layer.role})
        try:
            self.fs_dir(snap).mkdir(parents=True, mode=0o755)
            if layer.role == ROLE_BOOTSTRAP:
                self.remote.mount(layer.image, self.fs_dir(snap))
        except BaseException:
            self.store.remove(request.target)
            self._remove_dir(self._dir(snap))
            raise
        log.info("remote layer %s of %s committed as %s (prepare key %s)", layer.role,
                 layer.image, request.target, key)
        raise AlreadyExistsError(f"target snapshot {request.target} already exists")

    def _lowers(self, snap: Snapshot) -> list[Path]:
        """fs dirs of the parents, nearest first, as overlayfs lowers."""
        out: list[Path] = []
        for p in self.store.chain(snap):
            if p.remote is None:
                out.append(self.fs_dir(p))
                continue
            if p.remote.get("role") != ROLE_BOOTSTRAP:
                continue  # an empty blob snapshot; the bootstrap above it has its files
            mp = self.fs_dir(p)
            self._ensure_mounted(p, mp)
            out.append(mp)
            break  # the rafs mount is the whole image below this point
        return out

    def _ensure_mounted(self, snap: Snapshot, mp: Path) -> None:
        if self.remote is None:
            raise SnapshotterError(f"snapshot {snap.key} is a RAFS layer, but RAFS is disabled")
        if self.remote.is_serving(mp):
            return
        if self.remote.is_mounted(mp):  # its daemon died: detach the dead mount first
            self.remote.unmount(mp)
        log.warning("rafs mount of %s on %s is gone; mounting it again", snap.key, mp)
        self.remote.mount(str(snap.remote["image"]), mp)  # type: ignore[index]

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        lowers = self._lowers(snap)
        fs = self.fs_dir(snap)
        if not lowers:
            rw = "rw" if snap.kind == Kind.ACTIVE else "ro"
            return [Mount("bind", str(fs), (rw, "rbind"))]
        if snap.kind == Kind.VIEW and len(lowers) == 1:
            return [Mount("bind", str(lowers[0]), ("ro", "rbind"))]
        lowerdir = "lowerdir=" + ":".join(str(p) for p in lowers)
        if snap.kind == Kind.VIEW:
            return [Mount("overlay", "overlay", (lowerdir,))]
        return [Mount("overlay", "overlay", (
            "index=off", f"workdir={self._dir(snap) / 'work'}", f"upperdir={fs}", lowerdir,
        ))]

    def _remove_dir(self, d: Path) -> None:
        """Unmount and delete a snapshot directory; what fails is logged and left
        for ``cleanup`` (the metadata is already gone, as in containerd)."""
        fs = d / "fs"
        try:
            if self.remote is not None and self.remote.is_mounted(fs):
                self.remote.unmount(fs)
            shutil.rmtree(d)
        except FileNotFoundError:
            pass
        except Exception as e:
            log.warning("cannot remove %s (left for cleanup): %s", d, e)
