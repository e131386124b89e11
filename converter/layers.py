"""Applying layers, in order, onto one ``rafs.model.Node`` tree (OCI layer semantics).

This module owns the meaning of a layer's entries, following the OCI image
spec (layer.md) and what umoci/containerd do when they unpack:

- Names are normalised lexically: ``.`` and empty components are dropped,
  ``..`` removes the previous component. An absolute name (entry or hardlink
  target) and a ``..`` that would climb above the root are an
  ``UnsafePathError``: image builders never write them, so a layer that has
  them is broken or hostile (containerd and umoci would resolve them inside
  the root silently; we refuse such layers).
- Parent directories are looked up the way an unpacker on a real filesystem
  finds them: a symlink in the parent path is followed, scoped to the image
  root (like securejoin). Missing parents are created as ``0755 root:root``
  directories with mtime 0 (umoci uses ``MkdirAll(0777)`` under the usual
  umask 022, owned by the unpacking user, with the current time: we pick the
  same mode and owner and a fixed time so output is reproducible). A parent
  that is neither a directory nor a symlink is a ``BadTarError``.
- A later entry replaces an earlier one at the same path, whatever its layer;
  a directory over a directory keeps the children and takes the new metadata.
- ``.wh.NAME`` removes NAME and ``.wh..wh..opq`` empties its directory, but a
  whiteout only ever hides what *lower* layers put there: entries the same
  layer creates survive, whether they come before or after the whiteout (the
  spec's rule; umoci tracks "upper paths" for the same reason). Whiteouts of
  missing paths are ignored; other ``.wh..wh.`` names (AUFS metadata) are skipped.
- A hardlink shares its target's ``Node`` (it may be in a lower layer); the
  link entry's own metadata is ignored, as umoci does. A hardlink to a missing
  path or a directory is a ``LinkTargetError``. Removing the target's name later
  leaves the link, content and all.
- An entry for the root (``./``) sets the root's metadata and must be a directory.
- ``trusted.overlay.*`` xattrs are dropped: overlayfs would act on them when the
  mounted image is its lower layer, and OCI layers express whiteouts as files.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable

from rafs.model import Node

from .chunker import BlobWriter
from .errors import BadTarError, LinkTargetError, UnsafePathError
from .tarstream import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
NAME_MAX = 255  # EROFS_NAME_LEN
MAX_SYMLINKS = 40  # as Linux' MAXSYMLINKS
_DROPPED_XATTR_PREFIXES = (b"trusted.overlay.",)

_TYPE_BITS = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, SYMLINK: stat.S_IFLNK,
              CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


def _show(name: bytes) -> str:
    return os.fsdecode(name)


def normalise(name: bytes, what: str = "", absolute: bool = False) -> list[bytes]:
    """The components of a tar name relative to the root; UnsafePathError if it escapes.

    ``absolute`` accepts a leading ``/`` (for paths of the image, like the
    prefetch list, rather than names in a layer).
    """
    if name.startswith(b"/") and not absolute:
        raise UnsafePathError(f"{what}: {_show(name)!r} is an absolute name")
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise UnsafePathError(f"{what}: {_show(name)!r} escapes the image root")
            parts.pop()
            continue
        if len(part) > NAME_MAX:
            raise BadTarError(f"{what}: {_show(name)!r}: a name is longer than {NAME_MAX} bytes")
        parts.append(part)
    return parts


class PrefetchRanks:
    """Where a path stands in the prefetch list: the rank of the path itself or of its
    nearest listed ancestor directory (a directory prefetches what is below it)."""

    def __init__(self, paths: Iterable[bytes]) -> None:
        self._ranks: dict[bytes, int] = {}
        for i, path in enumerate(paths):
            self._ranks.setdefault(b"/".join(normalise(path, "prefetch list", absolute=True)), i)

    def __bool__(self) -> bool:
        return bool(self._ranks)

    def rank(self, real: list[bytes]) -> int | None:
        for i in range(len(real), -1, -1):
            found = self._ranks.get(b"/".join(real[:i]))
            if found is not None:
                return found
        return None


def new_root() -> Node:
    """The root before any layer: an implied directory."""
    return Node.directory(0o755)


class LayerApplier:
    """Applies the entries of one layer onto ``root``; file data goes to ``writer``."""

    def __init__(self, root: Node, writer: BlobWriter | None, what: str = "layer",
                 prefetch: PrefetchRanks | None = None) -> None:
        self.root = root
        self.writer = writer
        self.what = what
        self.prefetch = prefetch or None
        # Real (symlink-resolved) paths this layer created, and their ancestors.
        self._upper: set[bytes] = set()
        self.entries = 0

    # -- lookup ---------------------------------------------------------------

    def _walk(self, parts: Iterable[bytes], create: bool, name: bytes
              ) -> tuple[Node, list[bytes]] | None:
        """Resolve a directory path, following symlinks inside the root.

        Returns the directory node and its real path components, or None when
        a component is missing and ``create`` is false.
        """
        stack = list(reversed(list(parts)))
        nodes = [self.root]
        real: list[bytes] = []
        links = 0
        while stack:
            part = stack.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if real:
                    real.pop()
                    nodes.pop()
                continue
            cur = nodes[-1]
            assert cur.children is not None
            child = cur.children.get(part)
            if child is None:
                if not create:
                    return None
                child = Node.directory(0o755)
                cur.children[part] = child
            if stat.S_ISLNK(child.mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise BadTarError(f"{self.what}: {_show(name)!r}: too many levels of "
                                      "symbolic links")
                target = child.target
                if target.startswith(b"/"):
                    nodes, real = [self.root], []
                stack.extend(reversed(target.split(b"/")))
                continue
            if not child.is_dir:
                if not create:
                    return None
                raise BadTarError(f"{self.what}: {_show(name)!r}: "
                                  f"{_show(b'/'.join([*real, part]))!r} is not a directory")
            nodes.append(child)
            real.append(part)
        return nodes[-1], real

    def _mark_upper(self, real: list[bytes]) -> None:
        for i in range(len(real), -1, -1):
            self._upper.add(b"/".join(real[:i]))

    # -- entries --------------------------------------------------------------

    def apply(self, entry: Entry) -> None:
        """Apply one entry (and consume its data, for regular files)."""
        self.entries += 1
        parts = normalise(entry.name, self.what)
        if not parts:
            self._set_root(entry)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, entry.name)
            return
        found = self._walk(parts[:-1], create=True, name=entry.name)
        assert found is not None
        parent, real_dir = found
        assert parent.children is not None
        real = [*real_dir, base]
        existing = parent.children.get(base)

        if entry.kind == HARDLINK:
            node = self._link_target(entry, real)
            parent.children[base] = node
        elif entry.kind == DIR and existing is not None and existing.is_dir:
            self._set_meta(existing, entry)
        else:
            node = self._make(entry)
            parent.children[base] = node
            if entry.kind == FILE:
                self._read_data(node, entry, real)
        self._mark_upper(real)

    def _set_root(self, entry: Entry) -> None:
        if entry.kind != DIR:
            raise UnsafePathError(f"{self.what}: {_show(entry.name)!r}: the root can only be "
                                  "a directory")
        self._set_meta(self.root, entry)

    def _xattrs(self, entry: Entry) -> dict[bytes, bytes]:
        out = {}
        for k, v in entry.xattrs.items():
            if k.startswith(_DROPPED_XATTR_PREFIXES):
                log.info("%s: %r: dropping xattr %r", self.what, _show(entry.name), _show(k))
                continue
            out[k] = v
        return out

    def _set_meta(self, node: Node, entry: Entry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (entry.mode & 0o7777)
        node.uid, node.gid = entry.uid, entry.gid
        node.mtime, node.mtime_nsec = entry.mtime, entry.mtime_nsec
        node.xattrs = self._xattrs(entry)

    def _make(self, entry: Entry) -> Node:
        node = Node(
            mode=_TYPE_BITS[entry.kind] | (entry.mode & 0o7777),
            uid=entry.uid,
            gid=entry.gid,
            mtime=entry.mtime,
            mtime_nsec=entry.mtime_nsec,
            xattrs=self._xattrs(entry),
        )
        if entry.kind == DIR:
            node.children = {}
        elif entry.kind == SYMLINK:
            if not entry.linkname:
                raise BadTarError(f"{self.what}: {_show(entry.name)!r}: empty symlink target")
            node.target = entry.linkname
        elif entry.kind in (CHAR, BLOCK):
            node.rdev = entry.rdev
        return node

    def _read_data(self, node: Node, entry: Entry, real: list[bytes]) -> None:
        if entry.size == 0:
            node.size, node.chunks = 0, []
            return
        if self.writer is None or entry.data is None:
            raise AssertionError("a regular file with data needs a BlobWriter")
        rank = self.prefetch.rank(real) if self.prefetch is not None else None
        self.writer.add_file(node, entry.data, entry.size, rank)

    def _link_target(self, entry: Entry, real: list[bytes]) -> Node:
        parts = normalise(entry.linkname, self.what)
        if not parts:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink to the root")
        found = self._walk(parts[:-1], create=False, name=entry.linkname)
        target = None
        if found is not None:
            assert found[0].children is not None
            target = found[0].children.get(parts[-1])
            # An unpacker removes what is at the link's path before linking: a target
            # at or below that path is gone by then (umoci and containerd fail too).
            if [*found[1], parts[-1]][: len(real)] == real:
                target = None
        if target is None:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink target "
                                  f"{_show(entry.linkname)!r} does not exist")
        if target.is_dir:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink target "
                                  f"{_show(entry.linkname)!r} is a directory")
        return target

    # -- whiteouts ------------------------------------------------------------

    def _whiteout(self, parts: list[bytes], name: bytes) -> None:
        base = parts[-1]
        found = self._walk(parts[:-1], create=False, name=name)
        if found is None:
            log.debug("%s: whiteout %r: no such directory", self.what, _show(name))
            return
        parent, real_dir = found
        assert parent.children is not None
        if base == WHITEOUT_OPAQUE:
            self._prune(parent, b"/".join(real_dir))
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("%s: skipping whiteout metadata entry %r", self.what, _show(name))
            return
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in (b"", b".", b".."):
            raise UnsafePathError(f"{self.what}: {_show(name)!r}: bad whiteout name")
        node = parent.children.get(victim)
        if node is None:
            return
        path = b"/".join([*real_dir, victim])
        if path not in self._upper:
            del parent.children[victim]
        elif node.is_dir:
            self._prune(node, path)  # keep what this layer put there

    def _prune(self, directory: Node, path: bytes) -> None:
        """Remove every child of ``directory`` that this layer did not create."""
        assert directory.children is not None
        for name in list(directory.children):
            child_path = path + b"/" + name if path else name
            if child_path not in self._upper:
                del directory.children[name]
            else:
                child = directory.children[name]
                if child.is_dir:
                    self._prune(child, child_path)
