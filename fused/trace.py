"""The access trace: every file's first access, in order, for prefetch lists.

The vfs calls ``AccessTrace.touch(nid)`` when a regular file is opened or a
symlink read; only the first access of each inode is kept (a dict keeps
insertion order). Paths are found only when someone asks (``rafs trace``), by
one walk of the bootstrap: recording stays O(1) per access. A hardlinked
inode is reported under the first of its paths the walk meets.

The list is capped (``limit``) so that a workload that touches a whole image
cannot grow the daemon without bound; the cap is reported with the trace.
"""

from __future__ import annotations

import os
import stat

from rafs.bootstrap import Bootstrap

__all__ = ["AccessTrace", "ChunkTrace"]

DEFAULT_LIMIT = 1 << 20


class AccessTrace:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._order: dict[int, None] = {}
        self.truncated = False

    def touch(self, nid: int) -> None:
        order = self._order
        if nid in order:
            return
        if len(order) >= self.limit:
            self.truncated = True
            return
        order[nid] = None

    def __len__(self) -> int:
        return len(self._order)

    def nids(self) -> list[int]:
        return list(self._order)

    def paths(self, bootstrap: Bootstrap) -> list[bytes]:
        """Absolute paths of the traced inodes, in first-access order."""
        wanted = set(self._order)
        found: dict[int, bytes] = {}
        for path, node in bootstrap.walk():
            if node.nid in wanted and node.nid not in found:
                found[node.nid] = path
                if len(found) == len(wanted):
                    break
        return [found[nid] for nid in self._order if nid in found]

    def to_json(self, bootstrap: Bootstrap) -> dict[str, object]:
        return {"paths": [os.fsdecode(p) for p in self.paths(bootstrap)],
                "truncated": self.truncated}


class ChunkTrace:
    """The access trace of kernel mode, where the daemon never sees a file opened.

    The kernel asks the blob filesystem only for blob data its page cache lacks,
    so what can be recorded is the first read of each chunk. Asked for paths, the
    trace finds the regular files those chunks belong to (one walk of the
    bootstrap) and lists each file once, ordered by the first access to any of
    its chunks. Files without data and symlinks never appear.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._order: dict[int, None] = {}
        self.truncated = False

    def touch(self, chunk_index: int) -> None:
        order = self._order
        if chunk_index in order:
            return
        if len(order) >= self.limit:
            self.truncated = True
            return
        order[chunk_index] = None

    def __len__(self) -> int:
        return len(self._order)

    def paths(self, bootstrap: Bootstrap) -> list[bytes]:
        rank = {index: n for n, index in enumerate(self._order)}
        first: dict[int, tuple[int, bytes]] = {}  # nid -> (earliest rank, path)
        for path, node in bootstrap.walk():
            if node.nid in first or not stat.S_ISREG(node.mode):
                continue
            ranks = [rank[i] for i in bootstrap.file_chunks(node) if i in rank]
            if ranks:
                first[node.nid] = (min(ranks), path)
        return [path for _, path in sorted(first.values())]

    def to_json(self, bootstrap: Bootstrap) -> dict[str, object]:
        return {"paths": [os.fsdecode(p) for p in self.paths(bootstrap)],
                "truncated": self.truncated}
