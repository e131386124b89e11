"""Cached bytes are checked on every read and by ``rafs cache verify``; crashes and racing
evictors in other processes leave a correct cache.

Real processes (``tests.cache_procs``, the ``rafs`` CLI), real kill -9, real sqlite
and hole punching; tampering is done the way another process or a rotting disk
would, with that file's page cache dropped (``posix_fadvise``), never a global drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from fused.cacheindex import CacheIndex
from tests.cache_support import (
    capped_stack,
    files_image,
    random_files,
    read_everything,
    read_file,
    set_bits_have_rows,
    tamper,
)
from tests.fused_support import WrittenImage
from tests.helpers.mounts import rafs_cmd
from tests.helpers.procs import run

REPO = Path(__file__).resolve().parent.parent
CS = 64 << 10


def data_file(cache: Path, digest: str) -> Path:
    return cache / "blobs" / "sha256" / (digest.removeprefix("sha256:") + ".data")


def fill(img: WrittenImage, cache: Path, files: dict[str, bytes]) -> None:
    async def main() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_everything(s.vfs, files, random.Random(0)) == 0

    trio.run(main)


def test_bytes_changed_under_a_running_reader_are_never_served(tmp_path: Path):
    files = random_files(38, 5_000, 300_000)
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"
    rng = random.Random(7)

    async def main() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_everything(s.vfs, files, rng) == 0
            await s.cache.commit()
            path = data_file(cache, img.blob_digests[0])
            size = path.stat().st_size
            chunk_offsets = {s.cache.chunk(i).uncompressed_offset: i
                             for i in range(s.bootstrap.header.chunk_count)}
            spots = sorted(rng.sample(sorted(chunk_offsets), 20))
            tamper(path, [o + rng.randrange(0, 4000) for o in spots], rng)
            assert size == path.stat().st_size
            before = len(s.backend.reads)
            for _ in range(2):
                assert await read_everything(s.vfs, files, rng) == 0  # 0 wrong bytes
            assert s.stats.cache_corrupt == 20  # each bad chunk caught once, then refetched
            assert len(s.backend.reads) > before

    trio.run(main)
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr  # the refetches repaired the cache


def test_verify_finds_drops_and_refetches_bad_chunks_and_exits_3(tmp_path: Path):
    files = random_files(6, 50_000, 200_000)
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"
    fill(img, cache, files)
    tamper(data_file(cache, img.blob_digests[0]), [10, 3 * CS + 5], random.Random(1))
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache), timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stderr.startswith("rafs: error: 2 bad chunks") and res.stderr.count("\n") == 1
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache, "--json"), timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["bad"] == 0

    async def again() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_everything(s.vfs, files, random.Random(2)) == 0
            assert s.stats.cache_corrupt == 0 and len(s.backend.reads) == 2

    trio.run(again)


def test_a_lost_index_is_rebuilt_from_the_bitmaps_and_the_bootstraps(tmp_path: Path):
    from fused.cache import store_bootstrap

    files = random_files(6, 50_000, 200_000)
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"
    fill(img, cache, files)
    store_bootstrap(cache, "sha256:" + hashlib.sha256(img.bootstrap).hexdigest(), img.bootstrap)
    index = CacheIndex(cache)
    chunks = index.chunk_count()
    index.close()
    for p in cache.glob("index.db*"):
        p.unlink()
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache, "--json"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["adopted"] == chunks > 0
    index = CacheIndex(cache)
    assert index.chunk_count() == chunks
    index.close()
    assert set_bits_have_rows(cache) == []


def test_a_corrupt_index_file_is_set_aside_and_the_mount_still_reads(tmp_path: Path):
    files = random_files(3, 50_000, 100_000)
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"
    fill(img, cache, files)
    (cache / "index.db").write_bytes(b"not a database" * 100)
    for p in (cache / "index.db-wal", cache / "index.db-shm"):
        p.unlink(missing_ok=True)

    async def again() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_everything(s.vfs, files, random.Random(3)) == 0
            assert len(s.backend.reads) == 0  # the bitmaps are the truth, not the index

    trio.run(again)
    assert list(cache.glob("index.db.corrupt-*"))


def _populate_many(tmp_path: Path) -> tuple[WrittenImage, dict[str, bytes], Path, int]:
    files = random_files(60, 4096 * 20, 4096 * 60)
    img = files_image(tmp_path / "img", files, chunk_size=4096)
    cache = tmp_path / "cache"
    fill(img, cache, files)
    index = CacheIndex(cache)
    n = index.chunk_count()
    index.close()
    return img, files, cache, n


def _rows(cache: Path) -> int:
    db = sqlite3.connect(f"file:{cache / 'index.db'}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM chunks").fetchone()[0])
    except sqlite3.OperationalError:
        return -1
    finally:
        db.close()


@pytest.mark.fuse
def test_kill_9_in_the_middle_of_eviction_leaves_a_cache_verify_finds_clean(tmp_path: Path):
    img, files, cache, total = _populate_many(tmp_path)
    assert total > 2000
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_at = []
    for fraction in (0.9, 0.6, 0.3):
        before = _rows(cache)
        proc = subprocess.Popen(rafs_cmd("cache", "prune", "--to", "0", "--cache-dir", cache),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                n = _rows(cache)
                if 0 <= n < before * fraction:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        killed_at.append(_rows(cache))
        res = run(rafs_cmd("cache", "verify", "--cache-dir", cache, "--json"), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert report["bad"] == 0
        assert set_bits_have_rows(cache) == []

        async def read_back() -> None:
            async with capped_stack(img, cache) as s:
                assert await read_everything(s.vfs, files, random.Random(4)) == 0

        trio.run(read_back)  # fills it again for the next round
    assert any(0 < n < total for n in killed_at), killed_at  # killed mid-way at least once


@pytest.mark.fuse
def test_readers_and_evictors_in_other_processes_interleave_safely(tmp_path: Path):
    files = random_files(30, 20_000, 250_000)
    img = files_image(tmp_path / "img", files)
    (tmp_path / "img" / "expected.json").write_text(json.dumps({
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
        "ref": img.ref, "layout": str(img.layout), "bootstrap": img.bootstrap.hex(),
        "blobs": img.blob_digests,
    }))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seconds = "12"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.cache_procs", "reader",
                               str(tmp_path / "img"), str(cache), seconds], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(1)
    procs += [subprocess.Popen([sys.executable, "-m", "tests.cache_procs", "evictor",
                                str(cache), seconds, str(seed)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for seed in range(3)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    readers, evictors = results[:2], results[2:]
    assert all(r["wrong"] == 0 and r["errors"] == 0 and r["files"] > 0 for r in readers)
    assert sum(e["evicted"] for e in evictors) > 0
    assert sum(r["lost"] for r in readers) > 0  # the race did happen, and cost only refetches
    assert set_bits_have_rows(cache) == []
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache, "--json"), timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["bad"] == 0, res.stdout


@pytest.mark.fuse
def test_a_full_disk_does_not_fail_reads(tmp_path: Path):
    files = random_files(20, 100_000, 300_000)
    img = files_image(tmp_path / "img", files)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(small)],
                   check=True)
    try:
        cache = small / "cache"

        async def main() -> dict[str, object]:
            async with capped_stack(img, cache) as s:
                for _ in range(2):
                    assert await read_everything(s.vfs, files, random.Random(5)) == 0
                return s.stats.snapshot()

        stats = trio.run(main)
        assert stats["cache_enospc"] > 0  # the disk filled up
        assert stats["errors"] == 0
        assert stats["cache_evictions"] > 0  # and eviction gave room back
        res = run(rafs_cmd("cache", "verify", "--cache-dir", cache), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_reads_of_many_sizes_and_offsets_are_verified_and_exact(tmp_path: Path):
    files = {"a": os.urandom(5 * CS + 777), "b": os.urandom(3)}
    img = files_image(tmp_path / "img", files)
    rng = random.Random(9)

    async def main() -> None:
        async with capped_stack(img, tmp_path / "cache") as s:
            attr = s.vfs.lookup(1, b"a")
            assert attr is not None
            for _ in range(300):
                off = rng.randrange(0, attr.size)
                size = rng.choice([1, 100, 4096, CS - 1, CS, CS + 1, 3 * CS, 1 << 20])
                data = await s.vfs.read(attr.ino, off, size)
                assert bytes(data) == files["a"][off:off + size]
            assert await read_file(s.vfs, "b") == files["b"]

    trio.run(main)
