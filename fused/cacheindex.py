"""The host-wide index of the chunk cache: which chunk lives where, and when it was last used.

One SQLite database per cache directory (``index.db``, WAL mode), shared by
every daemon, the snapshotter's daemons and ``rafs cache``. SQLite because it
is in the standard library, is safe across processes (its own locking, a
crash leaves the last committed state) and answers the three questions the
cache asks quickly through indexes: where a chunk with this sha256 lives
(node-wide dedup), which chunks were used least recently (eviction), and how
many bytes the cache holds (the cap).

The index is a *hint*, never the truth: the bitmaps of ``fused.cache`` say
what is present, and every byte taken through the index is verified before it
is served. Its one invariant, which ``fused.cache`` and ``fused.evict`` keep:
**a set bit has a row** — a writer upserts the row before it sets the bits, an
evictor clears the bits before it deletes the row, and deletes only the row it
chose (by ``stamp``, which every upsert renews), so a row a writer renewed
meanwhile survives. A row without bits is harmless: it is skipped (and
eventually evicted, which only deletes it). A lost index (deleted, corrupt) is
rebuilt from the cached bootstraps and the bitmaps (``fused.evict.reconcile``).

Tables::

    blobs(id, digest)                         blob digests, by small integer id
    chunks(blob, off, size, digest, stamp, atime)   one row per (blob, offset); atime
                                              and every other time in milliseconds
    evicted(digest, at)                       chunks evicted lately (refetch counting)
    images(bootstrap, ref, manifest, last_used)     images daemons have served
    counters(name, value)                     host-wide totals (hits, misses, ...)
    meta(key, value)                          schema version; ``bytes``: sum of
                                              chunk sizes, kept by triggers

Every method is safe to call from any thread (one connection, one lock);
errors come out as ``CacheError``.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .errors import CacheError

__all__ = ["INDEX_NAME", "CacheIndex", "ChunkRow", "ImageRow", "now_ms"]

log = logging.getLogger(__name__)

INDEX_NAME = "index.db"
SCHEMA = 1
EVICTED_KEEP = 1 << 20  # rows of the evicted table kept for refetch counting

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('bytes', 0);
CREATE TABLE IF NOT EXISTS blobs(id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    blob INTEGER NOT NULL, off INTEGER NOT NULL, size INTEGER NOT NULL,
    digest BLOB NOT NULL, stamp INTEGER NOT NULL, atime INTEGER NOT NULL,
    PRIMARY KEY(blob, off)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_digest ON chunks(digest);
CREATE INDEX IF NOT EXISTS chunks_by_atime ON chunks(atime);
CREATE TRIGGER IF NOT EXISTS chunks_add AFTER INSERT ON chunks BEGIN
    UPDATE meta SET value = value + NEW.size WHERE key = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS chunks_del AFTER DELETE ON chunks BEGIN
    UPDATE meta SET value = value - OLD.size WHERE key = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS chunks_resize AFTER UPDATE OF size ON chunks BEGIN
    UPDATE meta SET value = value - OLD.size + NEW.size WHERE key = 'bytes'; END;
CREATE TABLE IF NOT EXISTS evicted(digest BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS evicted_by_at ON evicted(at);
CREATE TABLE IF NOT EXISTS images(
    bootstrap TEXT NOT NULL, ref TEXT NOT NULL, manifest TEXT,
    last_used INTEGER NOT NULL, PRIMARY KEY(bootstrap, ref));
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """One indexed chunk location."""

    blob: str  # blob digest
    off: int  # uncompressed offset in the blob's address space
    size: int
    digest: bytes  # sha256 of the uncompressed bytes
    stamp: int
    atime: int


@dataclass(frozen=True, slots=True)
class ImageRow:
    bootstrap: str
    ref: str
    manifest: str | None
    last_used: int


def _stamp() -> int:
    return random.getrandbits(62)


def now_ms() -> int:
    """Recency timestamps: milliseconds since the epoch (seconds would tie too often)."""
    return time.time_ns() // 1_000_000


class CacheIndex:
    """The index database of one cache directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / INDEX_NAME
        self._lock = threading.Lock()
        self._blob_ids: dict[str, int] = {}
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return self._connect()
        except sqlite3.DatabaseError as e:
            if not self.path.exists() or isinstance(e, sqlite3.OperationalError):
                raise CacheError(f"cache index {self.path}: {e}") from None
            aside = self.path.with_name(f"{INDEX_NAME}.corrupt-{int(time.time())}")
            log.error("cache index %s is unreadable (%s); moving it to %s and starting "
                      "a new one (`rafs cache verify` re-indexes the cache)", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, str(aside) + suffix)
            try:
                return self._connect()
            except sqlite3.Error as e2:
                raise CacheError(f"cache index {self.path}: {e2}") from None
        except OSError as e:
            raise CacheError(f"cache index {self.path}: {e.strerror}") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=256")  # keep the log near 1 MiB
            db.execute(f"PRAGMA journal_size_limit={1 << 20}")
            db.executescript(_SCHEMA)
            (schema,) = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if schema != SCHEMA:
                raise sqlite3.DatabaseError(f"schema {schema}, this rafs knows {SCHEMA}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """The connection, in one write transaction (``write``) or for plain reads."""
        with self._lock:
            db = self._db
            try:
                if not write:
                    yield db
                    return
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    self._blob_ids.clear()  # ids inserted by this transaction are gone
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as e:
                self._blob_ids.clear()
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise CacheError(f"cache index {self.path}: {e}") from None

    def _blob_id(self, db: sqlite3.Connection, digest: str) -> int:
        bid = self._blob_ids.get(digest)
        if bid is None:
            db.execute("INSERT OR IGNORE INTO blobs(digest) VALUES (?)", (digest,))
            (bid,) = db.execute("SELECT id FROM blobs WHERE digest=?", (digest,)).fetchone()
            self._blob_ids[digest] = bid
        return bid

    # -- writers (daemons) -----------------------------------------------------

    def commit_chunks(self, rows: Sequence[tuple[str, int, int, bytes]],
                      now: int | None = None) -> tuple[int, int]:
        """Upsert (blob, off, size, sha256) rows with fresh stamps, before their bits are set.

        Returns (indexed bytes after the commit, how many of these chunks had been
        evicted before: refetches).
        """
        now = now_ms() if now is None else now
        with self._tx() as db:
            refetched = 0
            for blob, off, size, digest in rows:
                db.execute(
                    "INSERT INTO chunks VALUES (?,?,?,?,?,?) ON CONFLICT(blob, off) DO UPDATE "
                    "SET size=excluded.size, digest=excluded.digest, stamp=excluded.stamp, "
                    "atime=excluded.atime",
                    (self._blob_id(db, blob), off, size, digest, _stamp(), now))
                refetched += db.execute("DELETE FROM evicted WHERE digest=?", (digest,)).rowcount
            (total,) = db.execute("SELECT value FROM meta WHERE key='bytes'").fetchone()
        return int(total), refetched

    def adopt(self, rows: Sequence[tuple[str, int, int, bytes]], now: int | None = None) -> None:
        """Index present chunks that have no row (a cache from before the index), keeping
        rows that exist."""
        now = now_ms() if now is None else now
        with self._tx() as db:
            for blob, off, size, digest in rows:
                db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                           (self._blob_id(db, blob), off, size, digest, _stamp(), now))

    def touch(self, rows: Iterable[tuple[str, int]], now: int | None = None) -> None:
        """Record a use of these (blob, off) locations (batched recency)."""
        now = now_ms() if now is None else now
        with self._tx() as db:
            db.executemany(
                "UPDATE chunks SET atime=? WHERE blob=? AND off=? AND atime<?",
                [(now, self._blob_id(db, blob), off, now) for blob, off in rows])

    def suspect(self, blob: str, off: int) -> None:
        """A row whose location did not hold its chunk: first in line for eviction."""
        with self._tx() as db:
            db.execute("UPDATE chunks SET atime=0 WHERE blob=? AND off=?",
                       (self._blob_id(db, blob), off))

    def record_image(self, bootstrap: str, ref: str, manifest: str | None,
                     now: int | None = None) -> None:
        now = now_ms() if now is None else now
        with self._tx() as db:
            db.execute("INSERT INTO images VALUES (?,?,?,?) ON CONFLICT(bootstrap, ref) DO "
                       "UPDATE SET manifest=excluded.manifest, last_used=excluded.last_used",
                       (bootstrap, ref, manifest, now))

    def add_counters(self, deltas: dict[str, int]) -> None:
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        with self._tx() as db:
            db.executemany("INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE "
                           "SET value = value + excluded.value", list(deltas.items()))

    # -- readers -----------------------------------------------------------------

    def find(self, digest: bytes, limit: int = 4) -> list[ChunkRow]:
        """Locations that may hold the chunk with this sha256, most recently used first."""
        with self._tx(write=False) as db:
            return [ChunkRow(*r) for r in db.execute(
                "SELECT b.digest, c.off, c.size, c.digest, c.stamp, c.atime FROM chunks c "
                "JOIN blobs b ON b.id = c.blob WHERE c.digest=? ORDER BY c.atime DESC LIMIT ?",
                (digest, limit))]

    def digests(self) -> set[bytes]:
        """The sha256 of every indexed chunk."""
        with self._tx(write=False) as db:
            return {d for (d,) in db.execute("SELECT DISTINCT digest FROM chunks")}

    def bytes(self) -> int:
        """Sum of the sizes of every indexed chunk."""
        with self._tx(write=False) as db:
            (total,) = db.execute("SELECT value FROM meta WHERE key='bytes'").fetchone()
        return int(total)

    def oldest(self, limit: int, after: tuple[int, str, int] | None = None) -> list[ChunkRow]:
        """Up to ``limit`` rows in least-recently-used order (after the (atime, blob, off)
        key ``after``, for paging)."""
        with self._tx(write=False) as db:
            if after is None:
                cur = db.execute(
                    "SELECT b.digest, c.off, c.size, c.digest, c.stamp, c.atime FROM chunks c "
                    "JOIN blobs b ON b.id = c.blob ORDER BY c.atime, c.blob, c.off LIMIT ?",
                    (limit,))
            else:
                atime, blob, off = after
                bid = self._blob_id(db, blob)
                cur = db.execute(
                    "SELECT b.digest, c.off, c.size, c.digest, c.stamp, c.atime FROM chunks c "
                    "JOIN blobs b ON b.id = c.blob WHERE (c.atime, c.blob, c.off) > (?,?,?) "
                    "ORDER BY c.atime, c.blob, c.off LIMIT ?", (atime, bid, off, limit))
            return [ChunkRow(*r) for r in cur]

    def rows_of_blob(self, blob: str) -> list[ChunkRow]:
        with self._tx(write=False) as db:
            return [ChunkRow(blob, *r) for r in db.execute(
                "SELECT c.off, c.size, c.digest, c.stamp, c.atime FROM chunks c JOIN blobs b "
                "ON b.id = c.blob WHERE b.digest=? ORDER BY c.off", (blob,))]

    def blob_stats(self) -> dict[str, tuple[int, int, int]]:
        """blob digest -> (chunks, bytes, newest atime) of every indexed blob."""
        with self._tx(write=False) as db:
            return {d: (n, s, a) for d, n, s, a in db.execute(
                "SELECT b.digest, count(*), total(c.size), max(c.atime) FROM chunks c "
                "JOIN blobs b ON b.id = c.blob GROUP BY c.blob")}

    def images(self) -> list[ImageRow]:
        with self._tx(write=False) as db:
            return [ImageRow(*r) for r in db.execute(
                "SELECT bootstrap, ref, manifest, last_used FROM images ORDER BY last_used")]

    def counters(self) -> dict[str, int]:
        with self._tx(write=False) as db:
            return dict(db.execute("SELECT name, value FROM counters"))

    def chunk_count(self) -> int:
        with self._tx(write=False) as db:
            (n,) = db.execute("SELECT count(*) FROM chunks").fetchone()
        return int(n)

    # -- evictors ------------------------------------------------------------------

    def forget(self, rows: Sequence[ChunkRow], now: int | None = None) -> int:
        """Delete these rows unless a writer renewed them since (their stamp moved on);
        remember their digests as evicted. Returns the rows deleted."""
        now = now_ms() if now is None else now
        deleted = 0
        with self._tx() as db:
            for r in rows:
                n = db.execute("DELETE FROM chunks WHERE blob=? AND off=? AND stamp=?",
                               (self._blob_id(db, r.blob), r.off, r.stamp)).rowcount
                if n:
                    deleted += n
                    db.execute("INSERT INTO evicted VALUES (?,?) ON CONFLICT(digest) DO "
                               "UPDATE SET at=excluded.at", (r.digest, now))
        return deleted

    def forget_image(self, bootstrap: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM images WHERE bootstrap=?", (bootstrap,))

    def trim_evicted(self, keep: int = EVICTED_KEEP) -> None:
        with self._tx() as db:
            (n,) = db.execute("SELECT count(*) FROM evicted").fetchone()
            if n > keep:
                db.execute("DELETE FROM evicted WHERE digest IN (SELECT digest FROM evicted "
                           "ORDER BY at LIMIT ?)", (n - keep,))
