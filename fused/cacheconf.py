"""Where the host's chunk cache lives and how big it may grow: sizes, defaults, the config file.

Owns the SIZE and LIMIT options (``parse_size`` is ``rafs.sizes``'s, the one
parser, with this package's error; ``parse_limit`` also takes ``15%`` of the
cache's file system),
the default cache directory, and the host config file every daemon, the
snapshotter and ``rafs cache`` read. Free of trio, FUSE and sqlite so the
command line imports it cheaply.

Default cache directory, first that applies:

1. ``$RAFS_CACHE_DIR``;
2. ``$RAFS_ROOT/cache`` when ``$RAFS_ROOT`` is set (a private runtime root
   keeps a private cache, as tests and benchmarks want);
3. ``dir`` in the ``[cache]`` table of the config file;
4. ``/var/lib/rafs/cache`` for root, else ``$XDG_CACHE_HOME/rafs``
   (``~/.cache/rafs``).

The config file is ``$RAFS_CONFIG``, else ``/etc/rafs/rafs.toml``; a missing
file means the defaults::

    [cache]
    dir = "/var/lib/rafs/cache"
    max = "20G"         # or "15%" of the cache's file system; absent: no cap
    min_free = "5%"     # evict while the file system has less free than this

Command-line flags (``--cache-max``, ``--cache-min-free``) override the file
for the process they are given to.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rafs import sizes

from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "CacheConfig",
    "Limit",
    "config_path",
    "default_cache_dir",
    "load_config",
    "parse_limit",
    "parse_size",
]

DEFAULT_CONFIG = Path("/etc/rafs/rafs.toml")
DEFAULT_MIN_FREE = "5%"
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(text: str) -> int:
    """Bytes of a SIZE (``rafs.sizes``), or ``ConfigError`` with one line."""
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True, slots=True)
class Limit:
    """A size in bytes, or a fraction of the file system the cache lives on."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, fs_bytes: int) -> int:
        if self.fraction is not None:
            return int(fs_bytes * self.fraction)
        assert self.bytes is not None
        return self.bytes

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return str(self.bytes)


def parse_limit(text: str) -> Limit:
    """A SIZE, or ``N%`` of the cache's file system (0-100)."""
    m = _PERCENT_RE.match(text)
    if m is not None:
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise ConfigError(f"bad size {text!r} (a percentage goes from 0% to 100%)")
        return Limit(fraction=pct / 100)
    try:
        return Limit(bytes=sizes.parse_size(text))
    except ValueError:
        raise ConfigError(f"bad size {text!r} ({sizes.SIZE_HINT}, or 15% of the file "
                          "system)") from None


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The host's cache settings as the config file (and the environment) give them."""

    dir: Path
    max: Limit | None = None  # None: no cap
    min_free: Limit | None = None  # None: never evict for free space
    source: Path | None = None  # the config file read, if any

    def with_flags(self, cache_max: str | None, cache_min_free: str | None) -> CacheConfig:
        """This config with the command line's ``--cache-max``/``--cache-min-free``."""
        return CacheConfig(
            self.dir,
            _flag_limit(cache_max, self.max),
            _flag_limit(cache_min_free, self.min_free),
            self.source,
        )


def _flag_limit(text: str | None, default: Limit | None) -> Limit | None:
    if text is None:
        return default
    if text.strip().lower() in ("none", "off", "unlimited"):
        return None
    return parse_limit(text)


def config_path() -> Path:
    env = os.environ.get("RAFS_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _read_config(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    table = data.get("cache", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [cache] must be a table")
    unknown = sorted(set(table) - {"dir", "max", "min_free"})
    if unknown:
        raise ConfigError(f"{path}: unknown key cache.{unknown[0]} (known: dir, max, min_free)")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: cache.{key} must be a string")
    return table


def _builtin_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/rafs/cache")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "rafs"


def load_config() -> CacheConfig:
    """The host's cache settings: the config file under the environment's overrides."""
    path = config_path()
    table = _read_config(path)

    def limit(key: str, default: str | None) -> Limit | None:
        text = table.get(key, default)
        if text is None or str(text).strip().lower() in ("none", "off", "unlimited"):
            return None
        try:
            return parse_limit(str(text))
        except ConfigError as e:
            raise ConfigError(f"{path}: cache.{key}: {e}") from None

    env_dir = os.environ.get("RAFS_CACHE_DIR")
    root = os.environ.get("RAFS_ROOT")
    if env_dir:
        where = Path(env_dir)
    elif root:
        where = Path(root) / "cache"
    elif "dir" in table:
        where = Path(str(table["dir"]))
    else:
        where = _builtin_dir()
    return CacheConfig(where.absolute(), limit("max", None), limit("min_free", DEFAULT_MIN_FREE),
                       path if table else None)


def default_cache_dir() -> Path:
    """The host's chunk cache directory (see the module docstring)."""
    return load_config().dir
