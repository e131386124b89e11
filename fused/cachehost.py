"""A daemon joining the host's chunk cache: its bootstrap held in use, the index, the evictor.

``held_bootstrap`` loads the image's bootstrap into the cache and takes its
in-use lock (``fused.cache`` rule 7), loading it again if garbage collection
removed it in between. ``open_cache`` builds the daemon's ``ChunkCache`` with
the host index (node-wide dedup, recency, the byte count) and an ``Evictor``
for the cap in force (``fused.cacheconf``: the host config file under the
command line's flags), and records the image for ``rafs cache status``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from rafs.bootstrap import Bootstrap

from .cache import ChunkCache, hold_bootstrap
from .cacheconf import CacheConfig, load_config
from .cacheindex import CacheIndex
from .errors import CacheError
from .evict import Evictor
from .stats import Stats

__all__ = ["held_bootstrap", "open_cache", "resolve_config"]

log = logging.getLogger(__name__)


async def held_bootstrap(load: Callable[[], Awaitable[Path]]) -> tuple[Path, int]:
    """(path, fd holding its in-use lock) of the bootstrap ``load`` puts in the cache."""
    for _attempt in range(3):
        path = await load()
        fd = await trio.to_thread.run_sync(hold_bootstrap, path)
        if fd is not None:
            return path, fd
        log.info("cached bootstrap %s was removed meanwhile; loading it again", path)
    raise CacheError(f"cached bootstrap {path} keeps being removed")


def resolve_config(cache_max: str | None, cache_min_free: str | None) -> CacheConfig:
    """The host config with a daemon's ``--cache-max``/``--cache-min-free`` over it."""
    return load_config().with_flags(cache_max, cache_min_free)


def open_cache(cache_dir: str | os.PathLike[str], bootstrap: Bootstrap, boot_path: Path,
               stats: Stats, config: CacheConfig, image: str) -> ChunkCache:
    """The daemon's chunk cache over ``bootstrap`` (close it after its ``run`` ends)."""
    try:
        index: CacheIndex | None = CacheIndex(cache_dir)
    except CacheError as e:
        log.warning("%s; serving without node-wide dedup, eviction or recency", e)
        index = None
    evictor = Evictor(cache_dir, index, config, stats) if index is not None else None
    cache = ChunkCache(cache_dir, bootstrap.blobs, bootstrap.chunk, stats, index=index,
                       evictor=evictor, owns_index=True)
    if index is not None:
        digest = f"{boot_path.parent.name}:{boot_path.name}"
        manifest = image.rpartition("@")[2] if "@" in image else None
        try:
            index.record_image(digest, image, manifest)
        except CacheError as e:
            log.warning("%s", e)
    if config.max is not None or config.min_free is not None:
        log.info("cache %s: cap %s, keeping %s free", cache_dir,
                 config.max if config.max is not None else "none",
                 config.min_free if config.min_free is not None else "nothing")
    return cache
