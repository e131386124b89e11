"""The eager tree: pull a plain OCI image whole and unpack it into a rootfs cache.

``ensure_rootfs`` returns ``<root>/rootfs/<digest>/rootfs``, unpacking it first
if needed (under a per-image lock, into a temp dir renamed into place when
complete, so an interrupted unpack never leaves a half tree that looks done).

Layers are read through ``converter.source.open_source`` and
``converter.tarstream.LayerStream`` (compression sniffed, digests and diff_ids
verified). What each entry means (whiteouts, opaque directories, replacement,
hardlinks, implied parents, symlinks in parent paths, unsafe names) is decided
by ``converter.layermodel``, the same model the converter builds its tree
with; ``Unpacker`` only performs the model's operations on disk and, after the
last layer, gives every directory its final metadata from the model's tree.

The model's paths are real paths: no symlink, no ``..``. On disk every parent
is opened component by component with ``O_NOFOLLOW | O_DIRECTORY`` and every
change is made relative to that directory fd, so even a disk that disagreed
with the model could not lead a write outside the root. Ownership, modes,
xattrs, device nodes and mtimes are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from converter.layermodel import Create, Layer, Link, Op, RealPath, Remove, directories, new_root
from converter.source import open_source
from converter.tarstream import Entry, LayerStream
from rafs.errors import RafsError
from rafs.model import Node

from .errors import UnpackError
from .image import ResolvedImage, registry_client
from .paths import rootfs_cache_dir

__all__ = ["Unpacker", "ensure_rootfs", "unpack_into"]

log = logging.getLogger(__name__)

_COPY = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def ensure_rootfs(image: ResolvedImage) -> Path:
    """The unpacked root file system of a plain image (unpacked now if not yet)."""
    base = rootfs_cache_dir() / image.key
    done = base / "rootfs"
    if done.is_dir():
        return done
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(base / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if done.is_dir():
            return done
        tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=base))
        try:
            started = time.monotonic()
            nbytes = unpack_into(image, tmp)
            os.rename(tmp, done)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("unpacked %s (%d bytes of layers) in %.1fs", image.ref, nbytes,
                 time.monotonic() - started)
    finally:
        os.close(fd)
    return done


def unpack_into(image: ResolvedImage, root: Path) -> int:
    """Unpack every layer of ``image`` into the empty directory ``root``; returns the
    layers' uncompressed size."""
    total = 0
    with contextlib.ExitStack() as stack:
        client = (stack.enter_context(registry_client(image.ref))
                  if image.ref.transport == "docker" else None)
        source = stack.enter_context(open_source(image.ref, client))
        unpacker = stack.enter_context(Unpacker(root))
        for layer in source.layers:
            if sys.stderr.isatty():
                print(f"rafs: unpacking layer {layer.index + 1}/{len(source.layers)}",
                      file=sys.stderr)
            with layer.open() as raw:
                stream = LayerStream(raw, what=layer.label, media_type=layer.media_type,
                                     digest=layer.digest, size=layer.size,
                                     diff_id=layer.diff_id)
                unpacker.apply_layer(stream.entries(), layer.label)
                total += stream.uncompressed_size
        unpacker.finish()
    return total


class Unpacker:
    """Unpacks layers, in order, into the empty directory ``root``.

    ``apply_layer`` for each layer, then ``finish`` (directory metadata);
    ``close`` (or the ``with`` block) releases the directory fds.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.tree = new_root()
        self._root_fd = os.open(root, _DIR_FLAGS)
        # Open fds of the directories from the root down to the last one used:
        # entries come grouped by directory, so most lookups reuse them.
        self._names: list[bytes] = []
        self._fds: list[int] = []

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._forget(())
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def apply_layer(self, entries: Iterable[Entry], what: str) -> None:
        """Apply one layer's entries."""
        layer = Layer(self.tree, what)
        for entry in entries:
            ops = layer.apply(entry)  # model errors (RafsError) pass through as they are
            try:
                for op in ops:
                    self._do(op)
            except RafsError:
                raise
            except OSError as e:
                raise UnpackError(f"{what}: {os.fsdecode(entry.name)!r}: "
                                  f"{e.strerror or e}") from None

    def finish(self) -> None:
        """Give every directory its final metadata (and mtime: after its last change)."""
        for path, node in directories(self.tree):
            try:
                fd = self._dir(path)
                os.chown(fd, node.uid, node.gid)
                os.chmod(fd, stat.S_IMODE(node.mode))
                for key, value in node.xattrs.items():
                    self._setxattr(fd, key, value, path)
                os.utime(fd, ns=(_ns(node), _ns(node)))
            except OSError as e:
                raise UnpackError(f"{os.fsdecode(b'/'.join(path)) or '/'}: "
                                  f"{e.strerror or e}") from None

    # -- operations -----------------------------------------------------------

    def _do(self, op: Op) -> None:
        if isinstance(op, Remove):
            self._remove(op.path)
        elif isinstance(op, Link):
            self._link(op.path, op.target)
        else:
            self._create(op)

    def _remove(self, path: RealPath) -> None:
        self._forget(path)
        fd = self._dir(path[:-1])
        st = os.lstat(path[-1], dir_fd=fd)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path[-1], dir_fd=fd)
        else:
            os.unlink(path[-1], dir_fd=fd)

    def _link(self, path: RealPath, target: RealPath) -> None:
        fd = self._dir(path[:-1])
        target_fd = self._open_dir(target[:-1])
        try:
            os.link(target[-1], path[-1], src_dir_fd=target_fd, dst_dir_fd=fd,
                    follow_symlinks=False)
        finally:
            os.close(target_fd)

    def _create(self, op: Create) -> None:
        node, name = op.node, op.path[-1]
        fd = self._dir(op.path[:-1])
        kind = stat.S_IFMT(node.mode)
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=fd)  # its metadata comes in finish()
        elif kind == stat.S_IFREG:
            self._write_file(fd, op.path, node, op.data)
        elif kind == stat.S_IFLNK:
            os.symlink(node.target, name, dir_fd=fd)
            self._set_meta(fd, op.path, node)
        else:
            if kind in (stat.S_IFCHR, stat.S_IFBLK):
                os.mknod(name, kind | 0o600, node.rdev, dir_fd=fd)
            else:
                os.mkfifo(name, 0o600, dir_fd=fd)
            self._set_meta(fd, op.path, node)

    def _write_file(self, dir_fd: int, path: RealPath, node: Node, data: BinaryIO | None
                    ) -> None:
        fd = os.open(path[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            if node.size:
                assert data is not None
                shutil.copyfileobj(data, f, _COPY)
            f.flush()
            os.chown(fd, node.uid, node.gid)  # before chmod: chown clears setuid bits
            os.chmod(fd, stat.S_IMODE(node.mode))
            for key, value in node.xattrs.items():
                self._setxattr(fd, key, value, path)
            os.utime(fd, ns=(_ns(node), _ns(node)))

    def _set_meta(self, dir_fd: int, path: RealPath, node: Node) -> None:
        """Metadata of a symlink, device or fifo (which cannot be opened to set it)."""
        name = path[-1]
        os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(node.mode):  # a symlink's mode is always 0777
            os.chmod(name, stat.S_IMODE(node.mode), dir_fd=dir_fd)
        if node.xattrs:
            # l*xattr by a path through the directory fd: never follows ``name`` itself.
            where = os.fsencode(f"/proc/self/fd/{dir_fd}/") + name
            for key, value in node.xattrs.items():
                self._setxattr(where, key, value, path)
        os.utime(name, ns=(_ns(node), _ns(node)), dir_fd=dir_fd, follow_symlinks=False)

    @staticmethod
    def _setxattr(target: int | bytes, key: bytes, value: bytes, path: RealPath) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:  # e.g. a host filesystem without trusted.* or security.*
            log.info("%r: cannot set xattr %r: %s", os.fsdecode(b"/".join(path)),
                     os.fsdecode(key), e.strerror)

    # -- directory fds --------------------------------------------------------

    def _dir(self, path: RealPath) -> int:
        """An fd of the directory at ``path`` (owned by the cache: do not close it)."""
        keep = 0
        while keep < min(len(path), len(self._names)) and self._names[keep] == path[keep]:
            keep += 1
        self._truncate(keep)
        for name in path[keep:]:
            parent = self._fds[-1] if self._fds else self._root_fd
            self._fds.append(os.open(name, _DIR_FLAGS, dir_fd=parent))
            self._names.append(name)
        return self._fds[-1] if self._fds else self._root_fd

    def _open_dir(self, path: RealPath) -> int:
        """A new fd of the directory at ``path`` (the caller closes it)."""
        fd = os.dup(self._root_fd)
        try:
            for name in path:
                parent, fd = fd, -1
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
                finally:
                    os.close(parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd

    def _forget(self, path: RealPath) -> None:
        """Close the cached fds of ``path`` and of everything below it."""
        if tuple(self._names[: len(path)]) == path:
            self._truncate(max(len(path) - 1, 0) if path else 0)

    def _truncate(self, keep: int) -> None:
        while len(self._fds) > keep:
            os.close(self._fds.pop())
            self._names.pop()


def _ns(node: Node) -> int:
    return node.mtime * 1_000_000_000 + node.mtime_nsec
