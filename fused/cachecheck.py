"""Looking at and repairing a chunk cache from outside the daemons: status, verify, prune, clear.

Every function here is safe while daemons run on the same cache (the rules of
``fused.cache``): bits are cleared only under the blob's lock after a second
look, files are removed only when nobody holds them in use, and a chunk a
daemon loses this way is fetched again, never served wrong.

- ``status``: size on disk, the cap in force, the file system, chunks and
  bytes indexed, hit ratio and the other host-wide counters, and per image
  (each cached bootstrap) the bytes of its chunks present and whether a
  daemon holds it in use.
- ``verify``: re-hash every present chunk against its sha256; drop bad ones;
  re-index present chunks the index lacks (from the cached bootstraps);
  clear bits no known chunk explains; punch data no bit covers in blobs nobody
  uses; drop bootstraps whose bytes no longer match their name.
- ``prune_image``: evict one image's chunks and remove its bootstrap if unused.
- ``clear``: evict everything; remove every file nobody uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rafs.bootstrap import Bootstrap
from rafs.errors import RafsError

from .blobcache import BlobCache, blob_digests, block_end
from .cacheconf import CacheConfig
from .cacheindex import CacheIndex, ChunkRow
from .errors import UnknownImageError
from .evict import (
    EvictReport,
    bootstrap_files,
    budget,
    evict_rows,
    evict_to,
    eviction_lock,
    in_use,
    remove_blob_files,
    remove_bootstrap,
    remove_empty_blobs,
)

__all__ = ["VerifyReport", "clear", "prune", "prune_image", "status", "verify"]

log = logging.getLogger(__name__)


def _open_bootstrap(path: Path) -> Bootstrap | None:
    try:
        return Bootstrap.open(path)
    except (OSError, RafsError) as e:
        log.warning("cached bootstrap %s is unreadable: %s", path, e)
        return None


def _known_chunks(root: Path) -> dict[str, dict[int, tuple[int, bytes]]]:
    """blob digest -> {uncompressed offset: (size, sha256)} from every cached bootstrap."""
    known: dict[str, dict[int, tuple[int, bytes]]] = {}
    for _digest, path, _mtime in bootstrap_files(root):
        b = _open_bootstrap(path)
        if b is None:
            continue
        try:
            for c in b.chunks():
                known.setdefault(b.blobs[c.blob_index].digest, {})[c.uncompressed_offset] = (
                    c.uncompressed_size, c.sha256)
        except RafsError as e:
            log.warning("cached bootstrap %s: %s", path, e)
        finally:
            b.close()
    return known


# -- status ------------------------------------------------------------------------------


def status(root: Path, config: CacheConfig) -> dict[str, Any]:
    """The cache as ``rafs cache status --json`` shows it."""
    b = budget(root, config) if root.is_dir() else None
    index = CacheIndex(root)
    try:
        counters = index.counters()
        images = {row.bootstrap: row for row in index.images()}
        out: dict[str, Any] = {
            "dir": str(root),
            "config": str(config.source) if config.source else None,
            "size": b.usage if b else 0,
            "cap": b.cap if b else None,
            "target": b.target if b else None,
            "max": str(config.max) if config.max is not None else None,
            "min_free": str(config.min_free) if config.min_free is not None else None,
            "fs_size": b.fs_size if b else None,
            "fs_free": b.fs_free if b else None,
            "index_size": sum(os.lstat(p).st_blocks * 512 for p in root.glob("index.db*")),
            "chunks": index.chunk_count(),
            "chunk_bytes": index.bytes(),
            "blobs": sum(1 for _ in blob_digests(root)),
            "hits": counters.get("hits", 0),
            "misses": counters.get("misses", 0),
            "hit_ratio": _ratio(counters.get("hits", 0), counters.get("misses", 0)),
            "counters": dict(sorted(counters.items())),
            "images": [],
        }
        for digest, path, mtime in reversed(bootstrap_files(root)):
            row = images.get(digest)
            out["images"].append({
                "bootstrap": digest,
                "ref": row.ref if row else None,
                "in_use": in_use(path),
                "last_used": mtime // 1000,
                **_image_use(root, path),
            })
        return out
    finally:
        index.close()


def _ratio(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None


def _image_use(root: Path, path: Path) -> dict[str, int]:
    b = _open_bootstrap(path)
    if b is None:
        return {"chunks": 0, "bytes": 0, "present_chunks": 0, "present_bytes": 0}
    files: dict[int, BlobCache | None] = {}
    chunks = total = present = present_bytes = 0
    try:
        for c in b.chunks():
            chunks += 1
            total += c.uncompressed_size
            if c.blob_index not in files:
                files[c.blob_index] = BlobCache.existing(root, b.blobs[c.blob_index].digest)
            f = files[c.blob_index]
            if (f is not None and c.uncompressed_offset + c.uncompressed_size <= f.span
                    and f.has(c.uncompressed_offset, c.uncompressed_size)):
                present += 1
                present_bytes += c.uncompressed_size
    except RafsError as e:
        log.warning("cached bootstrap %s: %s", path, e)
    finally:
        b.close()
        for f in files.values():
            if f is not None:
                f.close()
    return {"chunks": chunks, "bytes": total, "present_chunks": present,
            "present_bytes": present_bytes}


# -- verify ----------------------------------------------------------------------------


@dataclass(slots=True)
class VerifyReport:
    good: int = 0  # chunks whose bytes match their sha256
    bad: int = 0  # chunks that did not: dropped
    adopted: int = 0  # present chunks the index lacked, now indexed
    stale_rows: int = 0  # rows of chunks not present: deleted
    orphan_bits: int = 0  # 4 KiB blocks marked present that no known chunk explains
    orphan_bytes: int = 0  # data no bit covers, punched
    bad_bootstraps: int = 0
    unusable_blobs: int = 0  # blob files whose bitmap could not be read: removed
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def _drop_if_bad(f: BlobCache, off: int, size: int, digest: bytes) -> bool:
    """Under the lock: still set and still bad? then clear and punch. True if dropped."""
    with f.locked():
        if not f.has(off, size):
            return False
        data = os.pread(f.data_fd, size, off)
        if len(data) == size and hashlib.sha256(data).digest() == digest:
            return False
        f.update_locked(off, size, False)
    f.punch(off, block_end(off, size) - off)
    return True


def _allocated(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) extents of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def verify(root: Path) -> VerifyReport:
    """Re-hash every present chunk, repair the index, drop what is bad (see the module doc)."""
    report = VerifyReport()
    for digest, path, _mtime in bootstrap_files(root):
        try:
            ok = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
        except OSError as e:
            report.problems.append(f"bootstrap {digest}: {e.strerror}")
            continue
        if not ok:
            report.bad_bootstraps += 1
            if remove_bootstrap(root, digest, path, None):
                report.problems.append(f"bootstrap {digest} was corrupt: removed")
            else:
                report.problems.append(f"bootstrap {digest} is corrupt but in use: kept")
    known = _known_chunks(root)
    index = CacheIndex(root)
    try:
        seen: set[str] = set()
        for digest in list(blob_digests(root)):
            seen.add(digest)
            _verify_blob(root, index, digest, known.get(digest, {}), report)
        for digest in set(index.blob_stats()) - seen:  # rows of blobs whose files are gone
            rows = index.rows_of_blob(digest)
            report.stale_rows += index.forget(rows)
    finally:
        index.close()
    return report


def _verify_blob(root: Path, index: CacheIndex, digest: str,
                 known: dict[int, tuple[int, bytes]], report: VerifyReport) -> None:
    f = BlobCache.existing(root, digest)
    if f is None:
        if remove_blob_files(root, digest, index):
            report.unusable_blobs += 1
            report.problems.append(f"blob {digest}: unusable bitmap, files removed")
        return
    try:
        covered = _verify_rows(f, index, digest, report)
        adopt, orphans = _unexplained_blocks(f, digest, known, covered, report)
        if adopt:
            index.adopt(adopt)
            report.adopted += len(adopt)
        if orphans:
            # A writer sets bits only after upserting the row (rule 2), so bits without
            # any row are leftovers; clearing them costs at most a refetch.
            with f.locked():
                fresh = {r.off for r in index.rows_of_blob(digest)}
                for off, size in orphans:
                    if off not in fresh:
                        f.update_locked(off, size, False)
                        report.orphan_bits += 1
        _punch_orphan_data(root, f, digest, covered, report)
    finally:
        f.close()


def _verify_rows(f: BlobCache, index: CacheIndex, digest: str,
                 report: VerifyReport) -> dict[int, int]:
    """Re-hash every chunk the index lists for the blob; forget rows of chunks that are
    missing or bad (bad ones are dropped). Returns offset -> size of the good ones."""
    stale: list[ChunkRow] = []
    covered: dict[int, int] = {}
    for r in {r.off: r for r in index.rows_of_blob(digest)}.values():
        if r.off + r.size > f.span or not f.has(r.off, r.size):
            stale.append(r)
            continue
        data = os.pread(f.data_fd, r.size, r.off)
        if len(data) == r.size and hashlib.sha256(data).digest() == r.digest:
            report.good += 1
            covered[r.off] = r.size
        elif _drop_if_bad(f, r.off, r.size, r.digest):
            report.bad += 1
            stale.append(r)
            report.problems.append(f"blob {digest}: chunk at {r.off} was bad: dropped")
    if stale:
        report.stale_rows += index.forget(stale)
    return covered


def _unexplained_blocks(f: BlobCache, digest: str, known: dict[int, tuple[int, bytes]],
                        covered: dict[int, int], report: VerifyReport
                        ) -> tuple[list[tuple[str, int, int, bytes]], list[tuple[int, int]]]:
    """Present blocks no row explains: chunks of a cache from before the index (or whose
    row was lost). Those a cached bootstrap knows and whose data is right are to be
    adopted (and join ``covered``); the rest are orphan blocks to clear."""
    adopt: list[tuple[str, int, int, bytes]] = []
    orphans: list[tuple[int, int]] = []
    for start, length in f.set_ranges():
        pos, end = start, start + length
        while pos < end:
            if pos in covered:
                pos = block_end(pos, covered[pos])
                continue
            k = known.get(pos)
            if k is None or block_end(pos, k[0]) > end:
                orphans.append((pos, 4096))
                pos += 4096
                continue
            data = os.pread(f.data_fd, k[0], pos)
            if len(data) == k[0] and hashlib.sha256(data).digest() == k[1]:
                adopt.append((digest, pos, k[0], k[1]))
                covered[pos] = k[0]
                report.good += 1
            elif _drop_if_bad(f, pos, k[0], k[1]):
                report.bad += 1
                report.problems.append(f"blob {digest}: chunk at {pos} was bad: dropped")
            pos = block_end(pos, k[0])
    return adopt, orphans


def _punch_orphan_data(root: Path, f: BlobCache, digest: str,
                       covered: dict[int, int], report: VerifyReport) -> None:
    """Punch data no present chunk covers (an eviction killed between clearing and
    punching), only in blobs nobody uses: a daemon's in-flight write looks the same."""
    if in_use(f.data_path):
        return
    keep = sorted((off, block_end(off, size)) for off, size in covered.items())
    size = os.fstat(f.data_fd).st_size
    for start, length in _allocated(f.data_fd, size):
        pos, end = start, start + length
        for a, b in keep:
            if b <= pos or a >= end:
                continue
            if a > pos:
                f.punch(pos, a - pos)
                report.orphan_bytes += a - pos
            pos = max(pos, b)
        if pos < end:
            f.punch(pos, end - pos)
            report.orphan_bytes += end - pos


# -- prune and clear ---------------------------------------------------------------------


def _match_images(root: Path, index: CacheIndex, ref: str) -> list[tuple[str, Path]]:
    """Cached bootstraps of the image ``ref`` names: a reference a daemon served, a
    bootstrap digest (or a unique prefix of its hex), or a manifest digest."""
    files = {d: p for d, p, _ in bootstrap_files(root)}
    wanted = {ref, ref.removeprefix("docker://"), "docker://" + ref.removeprefix("docker://")}
    hits = {row.bootstrap for row in index.images()
            if row.ref in wanted or row.manifest == ref or row.bootstrap == ref}
    hexpart = ref.removeprefix("sha256:")
    if len(hexpart) >= 6 and all(ch in "0123456789abcdef" for ch in hexpart):
        hits |= {d for d in files if d.removeprefix("sha256:").startswith(hexpart)}
    return sorted((d, files[d]) for d in hits if d in files)


def prune_image(root: Path, ref: str) -> tuple[EvictReport, list[str]]:
    """Evict the chunks of the image ``ref``; remove its bootstrap unless in use.

    Returns the report and the bootstraps kept because a daemon uses them.
    """
    index = CacheIndex(root)
    try:
        matches = _match_images(root, index, ref)
        if not matches:
            raise UnknownImageError(f"no image {ref!r} in the cache {root} (see `rafs cache "
                                    "status`)")
        with eviction_lock(root):
            report = EvictReport()
            kept: list[str] = []
            files: dict[str, BlobCache | None] = {}
            try:
                for digest, path in matches:
                    b = _open_bootstrap(path)
                    if b is not None:
                        try:
                            wanted: dict[str, set[int]] = {}
                            for c in b.chunks():
                                wanted.setdefault(b.blobs[c.blob_index].digest, set()).add(
                                    c.uncompressed_offset)
                        except RafsError as e:
                            log.warning("cached bootstrap %s: %s", path, e)
                        finally:
                            b.close()
                        for blob, offsets in wanted.items():
                            rows = [r for r in index.rows_of_blob(blob) if r.off in offsets]
                            if rows:
                                evict_rows(root, index, rows, files, report)
                    if remove_bootstrap(root, digest, path, index):
                        report.bootstraps += 1
                    else:
                        kept.append(digest)
            finally:
                for f in files.values():
                    if f is not None:
                        f.close()
            report.blobs += remove_empty_blobs(root, index)
        return report, kept
    finally:
        index.close()


def prune(root: Path, config: CacheConfig, to: int | None) -> EvictReport:
    """Evict down to ``to`` bytes, or (None) to the target of the cap in force if over it."""
    index = CacheIndex(root)
    try:
        with eviction_lock(root):
            b = budget(root, config)
            target = to if to is not None else (b.target if b.over else None)
            if target is None:
                report = EvictReport(before=b.usage)
                report.blobs = remove_empty_blobs(root, index)
                report.after = b.usage
                return report
            return evict_to(root, index, target, b.usage)
    finally:
        index.close()


def clear(root: Path) -> EvictReport:
    """Evict every chunk; remove every bootstrap and blob file nobody uses."""
    index = CacheIndex(root)
    try:
        with eviction_lock(root):
            report = evict_to(root, index, 0)
            for digest in list(blob_digests(root)):
                if remove_blob_files(root, digest, index):
                    report.blobs += 1
            return report
    finally:
        index.close()

