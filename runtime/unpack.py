"""The eager baseline: pull a plain OCI image whole and unpack it into a rootfs cache.

``ensure_rootfs`` returns ``<root>/rootfs/<digest>/rootfs``, unpacking it first
if needed (under a per-image lock, into a temp dir renamed into place when
complete, so an interrupted unpack never leaves a half tree that looks done).

Layers are read through ``converter.source.open_source`` and
``converter.tarstream.LayerStream`` (compression sniffed, digests and diff_ids
verified) and applied in order with OCI semantics: ``.wh.NAME`` removes NAME
from the layers below, ``.wh..wh..opq`` empties its directory of what the
layers below put there, a new entry replaces whatever was at its path. Names
are normalised by ``converter.layers.normalise`` (no absolute or escaping
names) and every parent path is resolved inside the root
(``rootpath.resolve_in_root``), so a symlink in the image never leads a write
outside it. Ownership, modes, xattrs, device nodes and mtimes are kept.
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

from converter.layers import WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, normalise
from converter.source import open_source
from converter.tarstream import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    Entry,
    LayerStream,
)
from rafs.errors import RafsError

from .errors import UnpackError
from .image import ResolvedImage, registry_client
from .paths import rootfs_cache_dir
from .rootpath import resolve_in_root

__all__ = ["ensure_rootfs", "unpack_layer_entries"]

log = logging.getLogger(__name__)

_COPY = 1 << 20


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
            nbytes = _unpack(image, tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, done)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("unpacked %s (%d bytes of layers) in %.1fs", image.ref, nbytes,
                 time.monotonic() - started)
    finally:
        os.close(fd)
    return done


def _unpack(image: ResolvedImage, root: Path) -> int:
    total = 0
    with contextlib.ExitStack() as stack:
        client = (stack.enter_context(registry_client(image.ref))
                  if image.ref.transport == "docker" else None)
        source = stack.enter_context(open_source(image.ref, client))
        dir_times: dict[bytes, tuple[int, int]] = {}
        for layer in source.layers:
            if sys.stderr.isatty():
                print(f"rafs: unpacking layer {layer.index + 1}/{len(source.layers)}",
                      file=sys.stderr)
            with layer.open() as raw:
                stream = LayerStream(raw, what=layer.label, media_type=layer.media_type,
                                     digest=layer.digest, size=layer.size,
                                     diff_id=layer.diff_id)
                unpack_layer_entries(stream.entries(), os.fsencode(root), layer.label,
                                     dir_times)
                total += stream.uncompressed_size
        _set_dir_times(dir_times)
    return total


def _set_dir_times(dir_times: dict[bytes, tuple[int, int]]) -> None:
    """Directory mtimes last: every later entry in a directory changes its mtime."""
    for path in sorted(dir_times, key=len, reverse=True):
        sec, nsec = dir_times[path]
        ns = sec * 1_000_000_000 + nsec
        with contextlib.suppress(OSError):
            os.utime(path, ns=(ns, ns), follow_symlinks=False)


def unpack_layer_entries(entries: Iterable[Entry], root: bytes, what: str,
                         dir_times: dict[bytes, tuple[int, int]]) -> None:
    """Apply one layer's entries onto the tree at ``root``; the mtimes of the directories
    it names go into ``dir_times`` (set them after the last layer)."""
    applier = _Applier(root, what, dir_times)
    for entry in entries:
        try:
            applier.apply(entry)
        except RafsError:
            raise
        except OSError as e:
            raise UnpackError(f"{what}: {os.fsdecode(entry.name)!r}: "
                              f"{e.strerror or e}") from None


def _remove(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Applier:
    def __init__(self, root: bytes, what: str,
                 dir_times: dict[bytes, tuple[int, int]]) -> None:
        self.root = root
        self.what = what
        self.created: set[bytes] = set()  # relative paths this layer wrote
        self.dir_times = dir_times

    def _parent(self, parts: list[bytes]) -> bytes:
        """The host path of the parent directory of ``parts``, created if missing."""
        parent = resolve_in_root(self.root, b"/".join(parts[:-1]))
        if not os.path.isdir(parent):
            if os.path.lexists(parent):
                os.unlink(parent)
            os.makedirs(parent, mode=0o755, exist_ok=True)
        return parent

    def apply(self, entry: Entry) -> None:
        parts = normalise(entry.name, self.what)
        if not parts:  # the root directory itself
            if entry.kind == DIR:
                self._meta(self.root, entry)
                self.dir_times[self.root] = (entry.mtime, entry.mtime_nsec)
            return
        base = parts[-1]
        rel = b"/".join(parts)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
            return
        parent = self._parent(parts)
        path = os.path.join(parent, base)
        self.created.add(rel)
        if entry.kind == DIR:
            if not os.path.isdir(path) or os.path.islink(path):
                _remove(path)
                os.mkdir(path, 0o700)
            self._meta(path, entry)
            self.dir_times[path] = (entry.mtime, entry.mtime_nsec)
            return
        _remove(path)
        self.dir_times.pop(path, None)
        if entry.kind == FILE:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                if entry.data is not None and entry.size:
                    shutil.copyfileobj(entry.data, f, _COPY)
        elif entry.kind == SYMLINK:
            os.symlink(entry.linkname, path)
        elif entry.kind == HARDLINK:
            target_parts = normalise(entry.linkname, self.what)
            target = resolve_in_root(self.root, b"/".join(target_parts), follow_last=False)
            os.link(target, path, follow_symlinks=False)
            return  # a hard link shares its target's metadata
        elif entry.kind in (CHAR, BLOCK):
            kind = stat.S_IFCHR if entry.kind == CHAR else stat.S_IFBLK
            os.mknod(path, kind | 0o600, entry.rdev)
        elif entry.kind == FIFO:
            os.mkfifo(path, 0o600)
        else:
            raise UnpackError(f"{self.what}: {os.fsdecode(entry.name)!r}: unknown entry kind")
        self._meta(path, entry)

    def _meta(self, path: bytes, entry: Entry) -> None:
        is_link = entry.kind == SYMLINK
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, entry.mode & 0o7777)
            for key, value in entry.xattrs.items():
                try:
                    os.setxattr(path, key, value, follow_symlinks=False)
                except OSError as e:
                    log.info("%s: %r: cannot set xattr %r: %s", self.what,
                             os.fsdecode(entry.name), os.fsdecode(key), e.strerror)
        if entry.kind != DIR:
            ns = entry.mtime * 1_000_000_000 + entry.mtime_nsec
            os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _whiteout(self, parts: list[bytes]) -> None:
        base = parts[-1]
        parent = resolve_in_root(self.root, b"/".join(parts[:-1]))
        parent_rel = b"/".join(parts[:-1])
        if not os.path.isdir(parent):
            return
        if base == WHITEOUT_OPAQUE:
            self._prune(parent, parent_rel)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in (b"", b".", b".."):
            raise UnpackError(f"{self.what}: bad whiteout name {os.fsdecode(base)!r}")
        rel = parent_rel + b"/" + victim if parent_rel else victim
        if rel not in self.created:
            _remove(os.path.join(parent, victim))
            self.dir_times.pop(os.path.join(parent, victim), None)

    def _prune(self, directory: bytes, rel: bytes) -> None:
        """Remove what the layers below put in ``directory``, keep what this layer did."""
        for name in os.listdir(directory):
            child_rel = rel + b"/" + name if rel else name
            child = os.path.join(directory, name)
            if child_rel not in self.created:
                _remove(child)
            elif os.path.isdir(child) and not os.path.islink(child):
                self._prune(child, child_rel)
