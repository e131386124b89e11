"""The chunk cache under real mounts over a real registry, in both modes: a cap under load,
two daemons on one cache, tampered cache files, node-wide dedup across images converted
separately, a full disk, and the default cache directory.

Images are synthetic (random files, so compression cannot hide anything) converted by
``rafs convert`` and pushed to the session's ``docker-registry``; every mount goes through
``tests.helpers.mounts.mounted`` (always unmounted). Readers drop the page cache of each
file they read (``posix_fadvise`` on that file, never a global drop), so every reader's
reads reach the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.registry import RegistryServer
from fused.evict import measure
from tests.cache_support import tamper
from tests.helpers.mounts import mounted, rafs_cmd, rafs_mounts, read_stats
from tests.helpers.ocibuild import build_oci_image, file_entry
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

MODES = ("fuse", "kernel")
CHUNK = 256 << 10
WINDOW = 8 * CHUNK  # one fetch window: 8 requests of one chunk (amplification = 1 chunk)


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    yield
    leaked = [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
    for mp in leaked:
        subprocess.run(["umount", "-l", mp], check=False)
    assert not leaked, f"leaked mounts: {leaked}"


def push_image(registry: RegistryServer, tmp: Path, name: str, layers: list[dict[str, bytes]],
               prefetch: list[bytes] | None = None) -> str:
    from converter.convert import ConvertOptions, convert

    layout = tmp / f"{name}-oci"
    build_oci_image(layout, "v1", [[file_entry(f, d) for f, d in sorted(layer.items())]
                                   for layer in layers])
    ref = registry.ref(f"cache-test/{name}-{os.getpid()}-{tmp.name}", "v1")
    convert(f"oci:{layout}:v1", ref, ConvertOptions(chunk_size=CHUNK, progress=False,
                                                    prefetch=prefetch or []))
    return ref


def random_tree(n: int, low: int, high: int, seed: int, prefix: str = "data") -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}/f{i:03d}": rng.randbytes(rng.randrange(low, high)) for i in range(n)}


def read_and_check(root: Path, files: dict[str, bytes], rng: random.Random) -> tuple[int, int]:
    """Read every file in random order; (wrong files, errors). Drops each file's page cache."""
    wrong = errors = 0
    names = list(files)
    rng.shuffle(names)
    for name in names:
        try:
            fd = os.open(root / name, os.O_RDONLY)
            try:
                h = hashlib.sha256()
                while block := os.read(fd, 1 << 20):
                    h.update(block)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            errors += 1
            continue
        if h.digest() != hashlib.sha256(files[name]).digest():
            wrong += 1
    return wrong, errors


class Sampler:
    """The cache's size (``fused.evict.measure``) every 10 ms, in a thread."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.samples = cache, [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append(measure(self.cache))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def readers(roots: list[Path], files: dict[str, bytes], n: int) -> tuple[int, int]:
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        r = read_and_check(roots[k % len(roots)], files, random.Random(k))
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n
    return sum(r[0] for r in results), sum(r[1] for r in results)


@pytest.fixture(scope="module")
def big_image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[str, dict[str, bytes]]:
    files = random_tree(48, 100_000, 1_400_000, seed=11)
    return push_image(registry, tmp_path_factory.mktemp("big"), "big", [files]), files


@pytest.mark.parametrize("mode", MODES)
def test_a_cap_under_16_readers_holds_and_no_byte_is_wrong(tmp_path: Path, big_image, mode):
    ref, files = big_image
    total = sum(len(v) for v in files.values())
    cap = total * 30 // 100
    cache = tmp_path / "cache"
    args = ["--cache-max", str(cap), "--cache-min-free", "off", "--amplify-bytes", str(CHUNK),
            "--no-prefetch"]
    with mounted(ref, tmp_path / "mnt", cache, extra_args=args, mode=mode) as mnt, \
            Sampler(cache) as sampler:
        wrong, errors = readers([mnt], files, 16)
        stats = read_stats(mnt)["stats"]
    print(f"{mode}: cap {cap}, largest sample {max(sampler.samples)} ({len(sampler.samples)}"
          f" samples), evictions {stats['cache_evictions']}, refetched "
          f"{stats['cache_refetched']}, lost under a reader {stats['cache_lost']}, reads "
          f"{stats['read_requests']}")
    assert (wrong, errors) == (0, 0)
    assert stats["errors"] == 0
    assert stats["cache_evictions"] > 0 and stats["cache_refetched"] > 0
    assert max(sampler.samples) <= cap + WINDOW, (max(sampler.samples), cap, WINDOW)
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_two_daemons_on_one_cache_both_evicting(tmp_path: Path, big_image):
    ref, files = big_image
    total = sum(len(v) for v in files.values())
    cap = total * 30 // 100
    cache = tmp_path / "cache"
    args = ["--cache-max", str(cap), "--cache-min-free", "off", "--amplify-bytes", str(CHUNK),
            "--no-prefetch"]
    with mounted(ref, tmp_path / "a", cache, extra_args=args) as a, \
            mounted(ref, tmp_path / "b", cache, extra_args=args) as b, \
            Sampler(cache) as sampler:
        wrong, errors = readers([a, b], files, 16)
        sa, sb = read_stats(a)["stats"], read_stats(b)["stats"]
    print(f"two daemons: cap {cap}, largest sample {max(sampler.samples)}, evictions "
          f"{sa['cache_evictions']} + {sb['cache_evictions']}, lost {sa['cache_lost']} + "
          f"{sb['cache_lost']}")
    assert (wrong, errors) == (0, 0)
    assert sa["cache_evictions"] > 0 and sb["cache_evictions"] > 0  # both evicted
    # Each daemon holds back its own stores; the other's show at its next commit.
    assert max(sampler.samples) <= cap + 2 * WINDOW, (max(sampler.samples), cap)
    res = run(rafs_cmd("cache", "verify", "--cache-dir", cache), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("mode", MODES)
def test_tampered_cache_files_under_a_running_daemon_give_no_wrong_byte(
        tmp_path: Path, registry: RegistryServer, mode: str):
    files = random_tree(38, 2_000, 700_000, seed=23)
    ref = push_image(registry, tmp_path, "tamper", [files])
    cache = tmp_path / "cache"
    rng = random.Random(5)
    with mounted(ref, tmp_path / "mnt", cache, mode=mode, extra_args=["--no-prefetch"]) as mnt:
        assert read_and_check(mnt, files, rng) == (0, 0)
        time.sleep(0.5)  # let the committer set the bits
        data_files = list((cache / "blobs" / "sha256").glob("*.data"))
        assert data_files
        for path in data_files:
            size = path.stat().st_blocks * 512
            spots = [rng.randrange(0, max(1, path.stat().st_size - 16)) for _ in range(60)]
            tamper(path, spots, rng)
            assert path.stat().st_blocks * 512 >= size
        for _ in range(2):
            assert read_and_check(mnt, files, rng) == (0, 0)  # 0 wrong bytes
        stats = read_stats(mnt)["stats"]
    assert stats["cache_corrupt"] > 0 and stats["errors"] == 0


def test_an_image_converted_separately_reads_shared_files_from_the_other(
        tmp_path: Path, registry: RegistryServer):
    base = random_tree(30, 10_000, 600_000, seed=31, prefix="base")
    top_a = random_tree(5, 10_000, 300_000, seed=32, prefix="a")
    top_b = random_tree(5, 10_000, 300_000, seed=33, prefix="b")
    ref_a = push_image(registry, tmp_path, "dedup-a", [base, top_a])
    # B: the same base layer, converted on its own with a prefetch list: its blobs differ.
    prefetch = [f"/{n}".encode() for n in sorted(base, reverse=True)[:10]]
    ref_b = push_image(registry, tmp_path, "dedup-b", [base, top_b], prefetch=prefetch)
    cache = tmp_path / "cache"
    with mounted(ref_a, tmp_path / "a", cache, extra_args=["--no-prefetch"]) as a:
        assert read_and_check(a, {**base, **top_a}, random.Random(1)) == (0, 0)
    after_a = measure(cache)
    with mounted(ref_b, tmp_path / "b", cache, extra_args=["--no-prefetch"]) as b:
        registry.mark()
        assert read_and_check(b, base, random.Random(2)) == (0, 0)
        stats = read_stats(b)["stats"]
        gets = registry.blob_gets()
    assert stats["backend_bytes"] == 0 and gets == []  # 0 bytes fetched for shared files
    assert stats["dedup_hits"] > 0 and stats["dedup_bytes"] > 0
    assert measure(cache) - after_a < 1 << 20  # stored once: B added bitmaps, no data


def test_a_full_disk_does_not_fail_reads_of_a_mount(tmp_path: Path, registry: RegistryServer):
    files = random_tree(20, 100_000, 600_000, seed=41)
    ref = push_image(registry, tmp_path, "enospc", [files])
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        cache = small / "cache"
        # No free-space floor: the disk itself must fill (the floor would evict first).
        with mounted(ref, tmp_path / "mnt", cache,
                     extra_args=["--no-prefetch", "--cache-min-free", "off"]) as mnt:
            for k in range(2):
                assert read_and_check(mnt, files, random.Random(k)) == (0, 0)
            stats = read_stats(mnt)["stats"]
        assert stats["cache_enospc"] > 0 and stats["errors"] == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_mount_uses_the_host_cache_by_default_and_status_shows_it_in_use(
        tmp_path: Path, registry: RegistryServer):
    files = random_tree(3, 10_000, 50_000, seed=51)
    ref = push_image(registry, tmp_path, "default", [files])
    cache = tmp_path / "host-cache"
    env = {"RAFS_CACHE_DIR": str(cache), "RAFS_CONFIG": str(tmp_path / "none.toml")}
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = run(rafs_cmd("mount", ref, mp, "--cache-max", "lots"), env=env, timeout=60)
    assert "bad size 'lots'" in assert_clean_error(res)
    assert str(mp) not in rafs_mounts()
    res = run(rafs_cmd("mount", ref, mp), env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    try:
        assert read_and_check(mp, files, random.Random(1)) == (0, 0)
        assert read_stats(mp, env)["cache_dir"] == str(cache)
        res = run(rafs_cmd("stats", mp, "--prometheus"), env=env, timeout=60)
        for name in ("rafs_cache_bytes", "rafs_cache_evictions_total",
                     "rafs_cache_refetched_total", "rafs_cache_enospc_total",
                     "rafs_dedup_bytes_total", "rafs_cache_lost_total"):
            assert f"\n{name}{{" in res.stdout, name
        res = run(rafs_cmd("cache", "status", "--json"), env=env, timeout=60)
        status = json.loads(res.stdout)
        assert status["dir"] == str(cache)
        (image,) = status["images"]
        assert image["in_use"] and image["ref"] == ref
        res = run(rafs_cmd("cache", "clear"), env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert read_and_check(mp, files, random.Random(2)) == (0, 0)  # fetched again
    finally:
        run(rafs_cmd("umount", mp), env=env, timeout=60)
    res = run(rafs_cmd("cache", "status", "--json"), env=env, timeout=60)
    assert not json.loads(res.stdout)["images"][0]["in_use"]
