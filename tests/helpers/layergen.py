"""Random multi-layer images for the layer property test; one *case* is a stack of layers.

Owns: ``random_case(rng)`` (a case over a tiny namespace, so that entries collide
often), ``prefixed(case, prefix)`` (the same case moved below ``prefix/``, to put
many cases side by side in one image) and ``describe(case)`` (a listing that
reproduces a failure).

A case draws, in any order within a layer: regular files (empty, one byte,
crossing a 4 KiB chunk, contents shared between files and cases for dedup;
setuid/setgid, owners, user xattrs), directories (sticky, setgid, owners,
xattrs), symlinks stored with random modes and pointing anywhere (relative,
absolute, dangling, through other symlinks, at themselves, above the root),
hardlinks (to files of this or lower layers, to symlinks, to missing paths),
whiteouts and opaque whiteouts, devices and fifos, root entries, a directory
replaced by a file and back over three layers, and non-UTF-8 names.

Independent of rafs, like ``ocibuild``: the same ``random.Random`` seed always
gives the same case.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tests.helpers.ocibuild import DEFAULT_MTIME, Entry

__all__ = ["Case", "describe", "prefixed", "random_case"]

Case = list[list[Entry]]  # layers, bottom first

COMPONENTS = [b"a", b"b", b"d", b"l", b"\xe9t\xe9", "ü".encode()]  # one is not UTF-8
SHARED = bytes(range(256)) * 20  # 5120 bytes: crosses a 4 KiB chunk, shared for dedup
FILE_MODES = [0o644, 0o644, 0o755, 0o600, 0o4755, 0o2755]
DIR_MODES = [0o755, 0o755, 0o700, 0o1777, 0o2775]
SYMLINK_MODES = [0o777, 0o644, 0o755, 0o600]
IDS = [0, 0, 1000, 65534]
XATTRS: list[dict[str, bytes]] = [{}, {}, {}, {"user.k": b"v"}, {"user.bin": b"\x00\xff"}]
KINDS = (["file"] * 30 + ["dir"] * 14 + ["symlink"] * 16 + ["hardlink"] * 8
         + ["whiteout"] * 10 + ["opaque"] * 5 + ["root"] * 2 + ["chardev"] * 2
         + ["blockdev"] + ["fifo"] * 2)


class _Draw:
    """Draws one case, remembering what it named so that later entries refer to it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.dirs: list[bytes] = []
        self.files: list[bytes] = []
        self.links: list[bytes] = []

    def component(self) -> bytes:
        return self.rng.choice(COMPONENTS)

    def path(self) -> bytes:
        r = self.rng.random()
        known = self.dirs + self.links
        if r < 0.4 or not known:
            parent = b""
        elif r < 0.85:
            parent = self.rng.choice(known)
        else:
            parent = self.component() + b"/" + self.component()
        return parent + b"/" + self.component() if parent else self.component()

    def data(self) -> bytes:
        return self.rng.choice([b"", b"1", SHARED, SHARED[:4096], self.rng.randbytes(50)])

    def meta(self) -> dict[str, object]:
        return {"uid": self.rng.choice(IDS), "gid": self.rng.choice(IDS),
                "mtime": DEFAULT_MTIME + self.rng.randint(0, 3)}

    def symlink_target(self, name: bytes) -> bytes:
        known = self.dirs + self.files + self.links or [self.component()]
        if self.rng.random() < 0.04:  # climbs above the root: stops there (an image of its own)
            return b"../../../" + self.component()
        return self.rng.choice([
            self.rng.choice(known),  # relative, read from the link's own directory
            self.rng.choice(known),
            b"/" + self.rng.choice(known),  # absolute
            b"../" + self.component(),
            b"nothere/" + self.component(),  # dangling
            b"/" + self.rng.choice(self.links or [b"l"]) + b"/" + self.component(),  # via a link
            name.rpartition(b"/")[2],  # itself: a loop
            b"./" + self.component(),
        ])

    def entry(self) -> Entry:
        kind = self.rng.choice(KINDS)
        if kind == "root":
            return Entry("./", "dir", mode=self.rng.choice(DIR_MODES),
                         xattrs=self.rng.choice(XATTRS), **self.meta())  # type: ignore[arg-type]
        if kind == "opaque":
            where = self.rng.choice(self.dirs or [b""])
            return Entry(where + b"/.wh..wh..opq" if where else b".wh..wh..opq", "file")
        name = self.path()
        if kind == "whiteout":
            head, _, base = name.rpartition(b"/")
            return Entry(head + b"/.wh." + base if head else b".wh." + base, "file")
        if kind == "file":
            self.files.append(name)
            return Entry(name, "file", mode=self.rng.choice(FILE_MODES), data=self.data(),
                         xattrs=self.rng.choice(XATTRS), **self.meta())  # type: ignore[arg-type]
        if kind == "dir":
            self.dirs.append(name)
            return Entry(name, "dir", mode=self.rng.choice(DIR_MODES),
                         xattrs=self.rng.choice(XATTRS), **self.meta())  # type: ignore[arg-type]
        if kind == "symlink":
            target = self.symlink_target(name)
            if target != name.rpartition(b"/")[2]:  # no loops as parents: ELOOP, every time
                self.links.append(name)
            return Entry(name, "symlink", linkname=target,
                         mode=self.rng.choice(SYMLINK_MODES), **self.meta())  # type: ignore[arg-type]
        if kind == "hardlink":
            r = self.rng.random()
            pool = self.files if r < 0.8 else self.links if r < 0.9 else []
            target = self.rng.choice(pool) if pool else self.path()
            return Entry(name, "hardlink", linkname=target)
        if kind == "fifo":
            return Entry(name, "fifo", mode=0o600, **self.meta())  # type: ignore[arg-type]
        return Entry(name, kind, mode=0o660, devmajor=self.rng.choice([1, 7]),  # type: ignore[arg-type]
                     devminor=self.rng.randint(0, 9), **self.meta())


def random_case(rng: random.Random) -> Case:
    """One random stack of 1 to 4 layers of 1 to 8 entries each."""
    draw = _Draw(rng)
    layers: Case = [[draw.entry() for _ in range(rng.randint(1, 8))]
                    for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:  # a directory replaced by a file, and back
        name = draw.path()
        while len(layers) < 3:
            layers.append([])
        first = rng.randrange(len(layers) - 2)
        steps = [[Entry(name, "dir"), Entry(name + b"/x", "file", data=b"x")],
                 [Entry(name, "file", data=b"now a file")],
                 [Entry(name, "dir", mode=0o700), Entry(name + b"/y", "file", data=b"y")]]
        for layer, step in zip(layers[first:], steps, strict=False):
            at = rng.randint(0, len(layer))
            layer[at:at] = step
    return layers


def _under(prefix: bytes, name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    stripped = raw.strip(b"/")
    return prefix + b"/" + stripped if stripped not in (b"", b".") else prefix + b"/"


def prefixed(case: Case, prefix: bytes) -> Case:
    """The case below ``prefix/``: names, hardlink targets and absolute symlink targets
    move with it; its root entries become entries for ``prefix/``."""
    out: Case = []
    for layer in case:
        moved = []
        for e in layer:
            linkname = e.linkname.encode() if isinstance(e.linkname, str) else e.linkname
            if e.type == "hardlink":
                linkname = _under(prefix, linkname)
            elif e.type == "symlink" and linkname.startswith(b"/"):
                linkname = b"/" + prefix + linkname
            moved.append(Entry(_under(prefix, e.name), e.type, mode=e.mode, uid=e.uid,
                               gid=e.gid, mtime=e.mtime, data=e.data, linkname=linkname,
                               devmajor=e.devmajor, devminor=e.devminor, xattrs=e.xattrs))
        out.append(moved)
    return out


def describe(case: Sequence[Sequence[Entry]]) -> str:
    """One line per entry, layer by layer."""
    lines = []
    for i, layer in enumerate(case):
        lines.append(f"  layer {i}:")
        for e in layer:
            name = e.name if isinstance(e.name, bytes) else e.name.encode()
            extra = f" -> {e.linkname!r}" if e.linkname else ""
            if e.type == "file" and e.data:
                extra += f" ({len(e.data)} bytes)"
            mode = f" {e.mode:o}" if e.mode is not None else ""
            lines.append(f"    {e.type:8} {name!r}{extra}{mode} uid={e.uid} gid={e.gid}"
                         f"{' ' + str(e.xattrs) if e.xattrs else ''}")
    return "\n".join(lines)
