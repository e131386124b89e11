"""``rafs cache`` and the cache settings: SIZEs, the host config file, the default
directory, exit statuses, and one clear line for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import trio

from fused.cache import hold_bootstrap, store_bootstrap
from fused.cacheconf import Limit, load_config, parse_limit, parse_size
from fused.cacheindex import CacheIndex
from fused.errors import ConfigError
from fused.evict import measure
from tests.cache_support import capped_stack, files_image, random_files, read_everything
from tests.helpers.mounts import rafs_cmd
from tests.helpers.procs import assert_clean_error, run


def rafs(*args: object, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return run(rafs_cmd(*[str(a) for a in args]), env=env, timeout=120)


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("512K", 512 << 10), ("512k", 512 << 10), ("20G", 20 << 30),
    ("1.5GiB", 3 << 29), ("1MB", 1 << 20), (" 7 ", 7), ("2T", 2 << 40), ("0", 0),
])
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5", "10X", "1e9", "0x10", "12 G B"])
def test_bad_sizes_are_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^bad size"):
        parse_size(text)


def test_limits_take_a_share_of_the_file_system() -> None:
    assert parse_limit("15%") == Limit(fraction=0.15)
    assert parse_limit("15%").resolve(1000) == 150
    assert parse_limit("2G").resolve(1000) == 2 << 30
    with pytest.raises(ConfigError):
        parse_limit("150%")


@pytest.mark.root
def test_the_default_cache_dir_and_the_config_file(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "rafs.toml"
    conf.write_text('[cache]\ndir = "/srv/rafs-cache"\nmax = "20G"\nmin_free = "10%"\n')
    monkeypatch.setenv("RAFS_CONFIG", str(conf))
    monkeypatch.delenv("RAFS_CACHE_DIR", raising=False)
    monkeypatch.delenv("RAFS_ROOT", raising=False)
    c = load_config()
    assert c.dir == Path("/srv/rafs-cache") and c.max == Limit(bytes=20 << 30)
    assert c.min_free == Limit(fraction=0.1) and c.source == conf
    monkeypatch.setenv("RAFS_ROOT", str(tmp_path / "root"))
    assert load_config().dir == tmp_path / "root" / "cache"
    monkeypatch.setenv("RAFS_CACHE_DIR", str(tmp_path / "mine"))
    assert load_config().dir == tmp_path / "mine"
    assert c.with_flags("1G", "off").max == Limit(bytes=1 << 30)
    assert c.with_flags("1G", "off").min_free is None
    monkeypatch.setenv("RAFS_CONFIG", str(tmp_path / "missing.toml"))
    monkeypatch.delenv("RAFS_CACHE_DIR")
    monkeypatch.delenv("RAFS_ROOT")
    c = load_config()
    assert c.max is None and c.min_free == Limit(fraction=0.05) and c.source is None
    assert c.dir == Path("/var/lib/rafs/cache")  # the tests run as root


@pytest.mark.parametrize("content, says", [
    ('[cache]\nmax = "lots"\n', "cache.max: bad size 'lots'"),
    ('[cache]\nsize = "1G"\n', "unknown key cache.size"),
    ('[cache]\nmax = 5\n', "cache.max must be a string"),
    ("[cache\n", "rafs.toml"),
])
def test_a_bad_config_file_is_one_line(tmp_path: Path, content: str, says: str) -> None:
    conf = tmp_path / "rafs.toml"
    conf.write_text(content)
    (tmp_path / "c").mkdir()
    res = rafs("cache", "status", "--cache-dir", tmp_path / "c", env={"RAFS_CONFIG": str(conf)})
    assert says in assert_clean_error(res)


def test_bad_input_to_rafs_cache_is_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert "no cache at" in assert_clean_error(rafs("cache", "status", "--cache-dir", cache))
    cache.mkdir()
    assert "bad size 'lots'" in assert_clean_error(
        rafs("cache", "prune", "--to", "lots", "--cache-dir", cache))
    assert "no image 'nope'" in assert_clean_error(
        rafs("cache", "prune", "--image", "nope", "--cache-dir", cache))
    assert "not both" in assert_clean_error(
        rafs("cache", "prune", "--to", "1G", "--image", "x", "--cache-dir", cache))
    assert "bad size" in assert_clean_error(
        rafs("cache", "status", "--cache-max", "12 parsecs", "--cache-dir", cache))
    (tmp_path / "f").write_text("")
    assert "not a directory" in assert_clean_error(
        rafs("cache", "verify", "--cache-dir", tmp_path / "f"))
    res = rafs("cache", "clear", "--cache-dir", tmp_path / "nowhere")
    assert res.returncode == 0 and "nothing to clear" in res.stdout


def _populated(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, Path]], int]:
    """A cache holding two images' chunks and bootstraps, as daemons leave it."""
    cache = tmp_path / "cache"
    images = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        files = random_files(6, 50_000, 200_000, seed=seed)
        img = files_image(tmp_path / name, files)

        async def fill(img=img, files=files) -> None:
            async with capped_stack(img, cache) as s:
                assert await read_everything(s.vfs, files, random.Random(0)) == 0

        trio.run(fill)
        digest = "sha256:" + hashlib.sha256(img.bootstrap).hexdigest()
        path = store_bootstrap(cache, digest, img.bootstrap)
        index = CacheIndex(cache)
        index.record_image(digest, f"docker://registry.example/{name}:1", None)
        index.close()
        images[name] = (digest, path)
    return cache, images, measure(cache)


def test_status_shows_size_cap_images_and_use(tmp_path: Path) -> None:
    cache, images, size = _populated(tmp_path)
    held = hold_bootstrap(images["alpha"][1])
    try:
        res = rafs("cache", "status", "--cache-dir", cache, "--json", "--cache-max", "1G")
        assert res.returncode == 0, res.stderr
        s = json.loads(res.stdout)
        assert s["size"] == size and s["cap"] == 1 << 30 and s["chunks"] > 0
        assert s["hits"] + s["misses"] > 0 and 0 <= s["hit_ratio"] <= 1
        by_ref = {im["ref"]: im for im in s["images"]}
        alpha = by_ref["docker://registry.example/alpha:1"]
        assert alpha["in_use"] and not by_ref["docker://registry.example/beta:1"]["in_use"]
        assert alpha["present_bytes"] == alpha["bytes"] > 0
        res = rafs("cache", "status", "--cache-dir", cache)
        assert res.returncode == 0 and "in use" in res.stdout and "alpha" in res.stdout
    finally:
        if held is not None:
            os.close(held)


def test_prune_an_image_to_a_size_and_clear(tmp_path: Path) -> None:
    cache, images, size = _populated(tmp_path)
    held = hold_bootstrap(images["alpha"][1])
    try:
        res = rafs("cache", "prune", "--image", "registry.example/alpha:1", "--cache-dir", cache)
        assert res.returncode == 0, res.stderr
        assert "kept bootstrap" in res.stdout  # in use: its chunks go, the bootstrap stays
        s = json.loads(rafs("cache", "status", "--cache-dir", cache, "--json").stdout)
        by_ref = {im["ref"]: im for im in s["images"]}
        assert by_ref["docker://registry.example/alpha:1"]["present_bytes"] == 0
        beta = by_ref["docker://registry.example/beta:1"]
        assert beta["present_bytes"] == beta["bytes"] > 0
        res = rafs("cache", "prune", "--image", images["beta"][0][7:19], "--cache-dir", cache)
        assert res.returncode == 0, res.stderr  # by a digest prefix; unused: all of it goes
        assert not images["beta"][1].exists()
    finally:
        if held is not None:
            os.close(held)
    cache, images, size = _populated(tmp_path / "again")
    res = rafs("cache", "prune", "--to", str(size // 2), "--cache-dir", cache)
    assert res.returncode == 0, res.stderr
    assert measure(cache) <= size // 2
    res = rafs("cache", "clear", "--cache-dir", cache)
    assert res.returncode == 0, res.stderr
    assert measure(cache) == 0
    assert not list((cache / "blobs").rglob("*.data"))
    res = rafs("cache", "verify", "--cache-dir", cache)
    assert res.returncode == 0, res.stderr


def test_prune_without_options_applies_the_cap_in_force(tmp_path: Path) -> None:
    cache, _images, size = _populated(tmp_path)
    res = rafs("cache", "prune", "--cache-dir", cache, "--cache-max", str(size // 4))
    assert res.returncode == 0, res.stderr
    assert measure(cache) <= size // 4 * 0.9
    res = rafs("cache", "prune", "--cache-dir", cache)  # under the default cap: nothing
    assert res.returncode == 0 and "0 chunks" in res.stdout
