"""OCI layer semantics, written once: what each tar entry of a layer does to the image.

Pure: no I/O. ``Layer(root, what).apply(entry)`` changes the merged tree (a
``rafs.model.Node`` tree shared by every layer of one image) and returns what
changed as ``Op``s on *real* paths: component tuples relative to the root,
every parent a directory of the tree, never a symlink, never ``..``. Both
trees of the project are driven from it:

- the lazy tree (``converter.layers``): the model's tree *is* the image; the
  converter only streams the data of each ``Create`` of a regular file into chunks;
- the eager tree (``runtime.unpack``): performs every op on a real directory
  (through directory fds opened with ``O_NOFOLLOW``), then, after the last
  layer, sets every directory's final metadata from the tree (``directories``).

Why in ``converter/``: the model works on ``converter.tarstream.Entry``, the
reader of layers it belongs with, and ``runtime`` already imports the converter
to read layers (``source``, ``tarstream``). ``rafs/`` is the RAFS format and
the image; tar entries and their meaning are not part of it.

Each edge case is decided once, here. "containerd" is its naive applier
(``pkg/archive/tar.go``, ``applyNaive``), "umoci" is ``umoci raw unpack`` 0.4.7
(``oci/layer/tar_extract.go``), the reference the tests compare with. Where the
two disagree, the OCI image spec (``layer.md``) decides, then safety.

Names

- Names are cleaned lexically, as both do: empty and ``.`` components are
  dropped and ``..`` removes the previous component, before any symlink is
  looked at (``a/../b`` is ``b`` even when ``a`` is a symlink).
- An absolute name, or a ``..`` that climbs above the root, in an entry name or
  a hardlink target, is refused (``UnsafePathError``). containerd and umoci
  resolve them inside the root; image builders never write them, so a layer
  that has them is broken or hostile, and we refuse it rather than guess.
- A component longer than 255 bytes is refused (``BadTarError``): neither Linux
  nor EROFS can name it.

Parents

- Symlinks in the parent path are followed inside the root, as containerd's
  ``fs.RootPath`` and umoci's ``SecureJoin`` do: an absolute target restarts at
  the root, ``..`` stops at the root, more than 40 links is refused (ELOOP in
  both). The last component of a name is never followed.
- Missing parents, also those a dangling symlink points to, are created as
  directories 0755, owned by root, mtime 0, as mkdir(2) makes them: below a
  setgid directory they take its group and its setgid bit (umoci: 0777 minus
  the umask; containerd: 0755, then a chmod that clears the setgid bit; both
  use the time of the unpack, a fixed time keeps the output reproducible). A
  later entry for the directory sets its metadata.
- A parent that exists and is neither a directory nor a symlink to one is
  refused (``BadTarError``), as containerd's ``mkparent`` (ENOTDIR) and
  umoci 0.4.7's ``MkdirAll`` do (umoci 0.5 replaces it with a directory).

Entries

- A later entry replaces whatever is at its path, in its layer or below
  (remove, then create). A directory over a directory is merged: the children
  stay, the metadata is the new entry's (xattrs too: umoci clears the old ones
  first; containerd adds to them). A directory over a symlink to a directory
  replaces the symlink (both, without umoci's ``--keep-dirlinks``).
- The root entry (``./``) must be a directory and sets the root's metadata
  (umoci; containerd ignores root entries); another type is refused (umoci:
  "malicious tar entry").
- A symlink keeps its target byte for byte (absolute, relative, dangling, a
  loop); an empty target is refused (symlink(2) fails in both). Its mode is
  always 0777 (``S_IFLNK | 0o777``): Linux symlinks have no permission bits of
  their own, ``lstat`` shows 0777 on every Linux filesystem whatever the tar
  header says, and both unpackers ignore the header's mode for them.
- A hardlink shares its target's node. The target's parent is resolved like any
  parent, its last component is not followed (a hardlink to a symlink links
  the symlink, as containerd's ``hardlinkRootPath`` and umoci do), and it is
  looked up after what is at the link's own path has been removed, as both
  do: a target at, below or reached through that path is missing. A missing
  target or a directory is refused (``LinkTargetError``; link(2) fails in
  both). The link entry's own metadata is ignored (umoci; containerd applies
  it to the shared inode; image builders write the same metadata for every
  name of an inode). Replacing or removing one name later leaves the others,
  content and all.

Whiteouts

- ``.wh.NAME`` removes NAME and ``.wh..wh..opq`` empties its directory, but only
  of what lower layers put there: what this layer creates at or below that
  path, before or after the whiteout in the stream, survives. That is the
  spec's rule and umoci's ``upperPaths``; containerd's naive applier removes
  same-layer entries of a plain whiteout too. Paths count by their real
  (symlink-resolved) location.
- A whiteout's parent is resolved like any parent but never created: a
  whiteout under a missing path or under a non-directory does nothing (umoci;
  containerd creates the missing parents first). A whiteout of a missing name
  does nothing (both).
- Other ``.wh..wh.`` names (AUFS metadata) are skipped (both, in effect);
  ``.wh.`` with an empty name, ``.`` or ``..`` is refused (containerd:
  "invalid whiteout name"; umoci: "invalid whiteout").
- A whiteout's type, mode and data mean nothing; only its name counts.

Xattrs

- ``trusted.overlay.*`` are dropped: overlayfs would act on them when the
  image is the lower layer of a container, and OCI layers express whiteouts
  as files (containerd and umoci 0.4.7 set them; umoci 0.5 renames them).
- ``security.selinux`` and ``system.nfs4_acl`` are dropped: they are the
  host's, not the image's (umoci ignores them; containerd sets them).
- ``user.*`` on anything but a regular file or a directory is dropped: Linux
  refuses them there (EPERM; containerd ignores that error, umoci 0.4.7 fails).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from rafs.model import Node

from .errors import BadTarError, LinkTargetError, UnsafePathError
from .tarstream import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry

__all__ = ["Create", "Layer", "Link", "Op", "RealPath", "Remove", "directories", "new_root",
           "normalise"]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
NAME_MAX = 255  # EROFS_NAME_LEN, and Linux' NAME_MAX
MAX_SYMLINKS = 40  # as Linux' MAXSYMLINKS
SYMLINK_MODE = stat.S_IFLNK | 0o777
IMPLIED_DIR_MODE = 0o755
_DROPPED_XATTR_PREFIXES = (b"trusted.overlay.",)
_DROPPED_XATTRS = frozenset({b"security.selinux", b"system.nfs4_acl"})
_USER_XATTR_PREFIX = b"user."

_TYPE_BITS = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, SYMLINK: stat.S_IFLNK,
              CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}

RealPath = tuple[bytes, ...]  # components below the root; every parent a real directory


@dataclass(frozen=True, slots=True)
class Create:
    """A new object at ``path``, of ``node``'s type and metadata.

    A directory is created empty; its metadata is final only after the last
    layer (a later entry may change it: see ``directories``). A regular file's
    ``node.size`` bytes are in ``data``, to be read before the next entry.
    """

    path: RealPath
    node: Node
    data: BinaryIO | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """A new name ``path`` for the existing object at ``target``."""

    path: RealPath
    target: RealPath


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove what is at ``path``, with everything below it."""

    path: RealPath


Op = Create | Link | Remove


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


def new_root() -> Node:
    """The root before any layer: an implied directory."""
    return Node.directory(IMPLIED_DIR_MODE)


def _implied_dir(parent: Node) -> Node:
    """A directory no entry named (yet), created in ``parent`` as mkdir(2) would."""
    node = Node.directory(IMPLIED_DIR_MODE)
    if parent.mode & stat.S_ISGID:
        node.mode |= stat.S_ISGID
        node.gid = parent.gid
    return node


def directories(root: Node) -> Iterator[tuple[RealPath, Node]]:
    """Every directory of the tree with its real path, parents before children."""
    stack: list[tuple[RealPath, Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        assert node.children is not None
        for name in sorted(node.children, reverse=True):
            child = node.children[name]
            if child.is_dir:
                stack.append(((*path, name), child))


class Layer:
    """One layer being applied onto ``root``, the tree of the layers below it."""

    def __init__(self, root: Node, what: str = "layer") -> None:
        self.root = root
        self.what = what
        # Real paths this layer created, and their ancestors: what its whiteouts spare.
        self._upper: set[RealPath] = set()
        self.entries = 0

    def apply(self, entry: Entry) -> list[Op]:
        """Apply one entry to the tree; returns the changes, in the order to make them."""
        self.entries += 1
        parts = normalise(entry.name, self.what)
        if not parts:
            self._set_root(entry)
            return []
        if parts[-1].startswith(WHITEOUT_PREFIX):
            return self._whiteout(parts, entry.name)
        ops: list[Op] = []
        found = self._walk(parts[:-1], entry.name, ops)
        assert found is not None
        parent, real_dir = found
        assert parent.children is not None
        base = parts[-1]
        real = (*real_dir, base)
        existing = parent.children.get(base)
        if entry.kind == DIR and existing is not None and existing.is_dir:
            self._set_meta(existing, entry)
        else:
            if entry.kind == HARDLINK:
                node, target = self._link_target(entry, parent, base)
                op: Op = Link(real, target)
            else:
                node = self._make(entry)
                op = Create(real, node, entry.data if entry.kind == FILE else None)
            if existing is not None:
                ops.append(Remove(real))
            parent.children[base] = node
            ops.append(op)
        self._mark_upper(real)
        return ops

    # -- lookup ---------------------------------------------------------------

    def _walk(self, parts: Iterable[bytes], name: bytes, create: list[Op] | None
              ) -> tuple[Node, RealPath] | None:
        """Resolve a directory path, following symlinks inside the root.

        Returns the directory node and its real path. A missing component is
        created when ``create`` is a list (its ``Create`` op is appended there);
        otherwise the answer is None, as it is for a component that is not a
        directory. A non-directory on the way is a BadTarError when creating.
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
                if create is None:
                    return None
                child = _implied_dir(cur)
                cur.children[part] = child
                create.append(Create((*real, part), child))
            if stat.S_ISLNK(child.mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise BadTarError(f"{self.what}: {_show(name)!r}: too many levels of "
                                      "symbolic links")
                if child.target.startswith(b"/"):
                    nodes, real = [self.root], []
                stack.extend(reversed(child.target.split(b"/")))
                continue
            if not child.is_dir:
                if create is None:
                    return None
                raise BadTarError(f"{self.what}: {_show(name)!r}: "
                                  f"{_show(b'/'.join([*real, part]))!r} is not a directory")
            nodes.append(child)
            real.append(part)
        return nodes[-1], tuple(real)

    def _mark_upper(self, real: RealPath) -> None:
        for i in range(len(real), -1, -1):
            self._upper.add(real[:i])

    # -- entries --------------------------------------------------------------

    def _set_root(self, entry: Entry) -> None:
        if entry.kind != DIR:
            raise UnsafePathError(f"{self.what}: {_show(entry.name)!r}: the root can only be "
                                  "a directory")
        self._set_meta(self.root, entry)

    def _xattrs(self, entry: Entry) -> dict[bytes, bytes]:
        out = {}
        for k, v in entry.xattrs.items():
            if k in _DROPPED_XATTRS or k.startswith(_DROPPED_XATTR_PREFIXES) or (
                    k.startswith(_USER_XATTR_PREFIX) and entry.kind not in (FILE, DIR)):
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
        elif entry.kind == FILE:
            node.size = entry.size
        elif entry.kind == SYMLINK:
            if not entry.linkname:
                raise BadTarError(f"{self.what}: {_show(entry.name)!r}: empty symlink target")
            node.mode = SYMLINK_MODE
            node.target = entry.linkname
        elif entry.kind in (CHAR, BLOCK):
            node.rdev = entry.rdev
        return node

    def _link_target(self, entry: Entry, parent: Node, base: bytes) -> tuple[Node, RealPath]:
        """The node a hardlink entry in ``parent`` names, and its real path.

        Looked up as an unpacker does, after what is at the link's own path has
        been removed: a target at, below or reached through that path is missing.
        """
        parts = normalise(entry.linkname, self.what)
        if not parts:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink to the root")
        assert parent.children is not None
        existing = parent.children.pop(base, None)
        try:
            found = self._walk(parts[:-1], entry.linkname, None)
        finally:
            if existing is not None:
                parent.children[base] = existing
        target = None
        if found is not None and (found[0] is not parent or parts[-1] != base):
            assert found[0].children is not None
            target = found[0].children.get(parts[-1])
        if found is None or target is None:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink target "
                                  f"{_show(entry.linkname)!r} does not exist")
        if target.is_dir:
            raise LinkTargetError(f"{self.what}: {_show(entry.name)!r}: hardlink target "
                                  f"{_show(entry.linkname)!r} is a directory")
        return target, (*found[1], parts[-1])

    # -- whiteouts ------------------------------------------------------------

    def _whiteout(self, parts: list[bytes], name: bytes) -> list[Op]:
        base = parts[-1]
        found = self._walk(parts[:-1], name, None)
        if found is None:
            log.debug("%s: whiteout %r: no such directory", self.what, _show(name))
            return []
        parent, real_dir = found
        assert parent.children is not None
        ops: list[Op] = []
        if base == WHITEOUT_OPAQUE:
            self._prune(parent, real_dir, ops)
            return ops
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("%s: skipping whiteout metadata entry %r", self.what, _show(name))
            return ops
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in (b"", b".", b".."):
            raise UnsafePathError(f"{self.what}: {_show(name)!r}: bad whiteout name")
        node = parent.children.get(victim)
        if node is None:
            return ops
        path = (*real_dir, victim)
        if path not in self._upper:
            del parent.children[victim]
            ops.append(Remove(path))
        elif node.is_dir:
            self._prune(node, path, ops)  # keep what this layer put there
        return ops

    def _prune(self, directory: Node, path: RealPath, ops: list[Op]) -> None:
        """Remove every child of ``directory`` that this layer did not create."""
        assert directory.children is not None
        for name in sorted(directory.children):
            child_path = (*path, name)
            if child_path not in self._upper:
                del directory.children[name]
                ops.append(Remove(child_path))
            else:
                child = directory.children[name]
                if child.is_dir:
                    self._prune(child, child_path, ops)
