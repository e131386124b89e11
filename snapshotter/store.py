"""Snapshot metadata in SQLite: what containerd's snapshot ``storage`` package keeps.

Owns the ``snapshots`` table under the snapshotter root (``metadata.db``) and
the rules containerd's metastore enforces on it:

- a key is unique among all snapshots, active, view and committed alike;
- a new snapshot's parent must exist (NotFound) and be committed
  (InvalidArgument);
- only an active snapshot can be committed (FailedPrecondition), under a name
  that is not taken (AlreadyExists); the committed snapshot keeps the active
  one's id, so its directory does not move;
- a snapshot with children cannot be removed (FailedPrecondition);
- name, parent, kind and creation time never change; labels do (``update``).

Each snapshot has an integer id that names its directory. A RAFS layer also
records ``remote``: what the snapshotter needs to mount it again (the image
reference and the layer's role). Every change is one transaction; the file
survives a restart of the snapshotter. Callers serialise access (the
``Snapshotter`` holds a lock around every call).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = ["Kind", "MetaStore", "Snapshot"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


class Kind(IntEnum):
    """containerd's snapshot kinds, numbered as in the snapshots API."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str  # the parent's name, "" for none
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0
    remote: dict[str, Any] | None = None


class MetaStore:
    """The snapshot table of one snapshotter root."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- reading ----------------------------------------------------------------

    _SELECT = (
        "SELECT s.id, s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, "
        "s.labels, s.size, s.inodes, s.remote FROM snapshots s "
        "LEFT JOIN snapshots p ON p.id = s.parent_id"
    )

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Snapshot:
        return Snapshot(
            id=row[0], key=row[1], parent=row[2], kind=Kind(row[3]), created_ns=row[4],
            updated_ns=row[5], labels=json.loads(row[6]), size=row[7], inodes=row[8],
            remote=json.loads(row[9]) if row[9] else None,
        )

    def find(self, key: str) -> Snapshot | None:
        row = self._db.execute(f"{self._SELECT} WHERE s.key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def get(self, key: str) -> Snapshot:
        snap = self.find(key)
        if snap is None:
            raise NotFoundError(f"snapshot {key} does not exist")
        return snap

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The parents of ``snap``, nearest first."""
        out: list[Snapshot] = []
        while snap.parent:
            snap = self.get(snap.parent)
            out.append(snap)
        return out

    def walk(self) -> list[Snapshot]:
        return [self._row(r) for r in self._db.execute(f"{self._SELECT} ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def has_children(self, snap: Snapshot) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snap.id,)
        ).fetchone()
        return row is not None

    # -- changing ---------------------------------------------------------------

    def create(
        self, key: str, parent: str, kind: Kind, labels: dict[str, str],
        remote: dict[str, Any] | None = None,
    ) -> Snapshot:
        """A new snapshot (active, view, or a remote layer created committed)."""
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        parent_id = None
        with self._tx():
            if self.find(key) is not None:
                raise AlreadyExistsError(f"snapshot {key} already exists")
            if parent:
                p = self.find(parent)
                if p is None:
                    raise NotFoundError(f"parent snapshot {parent} does not exist")
                if p.kind != Kind.COMMITTED:
                    raise InvalidArgumentError(f"parent {parent} is not a committed snapshot")
                parent_id = p.id
            now = time.time_ns()
            self._db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels, "
                "remote) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, parent_id, int(kind), now, now, json.dumps(labels, sort_keys=True),
                 json.dumps(remote, sort_keys=True) if remote else None),
            )
        return self.get(key)

    def commit(
        self, key: str, name: str, labels: dict[str, str], size: int, inodes: int
    ) -> Snapshot:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``."""
        if not name:
            raise InvalidArgumentError("committed snapshot name must not be empty")
        with self._tx():
            snap = self.get(key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPreconditionError(f"snapshot {key} is not active")
            if self.find(name) is not None:
                raise AlreadyExistsError(f"snapshot {name} already exists")
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, updated_ns = ?, labels = ?, size = ?, "
                "inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), time.time_ns(), json.dumps(labels, sort_keys=True),
                 size, inodes, snap.id),
            )
        return self.get(name)

    def remove(self, key: str) -> Snapshot:
        with self._tx():
            snap = self.get(key)
            if self.has_children(snap):
                raise FailedPreconditionError(f"cannot remove snapshot {key}: it has children")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self._tx():
            snap = self.get(key)
            self._db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (json.dumps(labels, sort_keys=True), time.time_ns(), snap.id),
            )
        return self.get(key)

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
