"""Processes for the multi-process cache tests: ``python -m tests.cache_procs ROLE ...``.

``reader IMAGE_DIR CACHE SECONDS``: a daemon's stack (no FUSE) over the image
written by the test, reading every file in random order until the time is up
and checking each against ``IMAGE_DIR/expected.json`` (name -> sha256 hex);
prints ``{"wrong": N, "errors": N, "files": N, "lost": N}``.

``evictor CACHE SECONDS SEED``: evicts to random targets in a loop, without the
eviction lock (so several of them interleave freely); prints the chunks evicted.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import trio

from fused.cacheindex import CacheIndex
from fused.errors import ChunkError
from fused.evict import evict_to, measure
from tests.cache_support import capped_stack, read_file
from tests.fused_support import WrittenImage


def reader(image_dir: Path, cache: Path, seconds: float) -> dict[str, int]:
    meta = json.loads((image_dir / "expected.json").read_text())
    expected: dict[str, str] = meta["files"]
    img = WrittenImage(meta["ref"], Path(meta["layout"]), bytes.fromhex(meta["bootstrap"]),
                       meta["blobs"])
    out = {"wrong": 0, "errors": 0, "files": 0, "lost": 0}

    async def main() -> None:
        async with capped_stack(img, cache) as s:
            rng = random.Random()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                names = list(expected)
                rng.shuffle(names)
                for name in names:
                    try:
                        data = await read_file(s.vfs, name)
                    except ChunkError:
                        out["errors"] += 1
                        continue
                    out["files"] += 1
                    if hashlib.sha256(data).hexdigest() != expected[name]:
                        out["wrong"] += 1
            out["lost"] = s.stats.cache_lost

    trio.run(main)
    return out


def evictor(cache: Path, seconds: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    index = CacheIndex(cache)
    chunks = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            usage = measure(cache)
            chunks += evict_to(cache, index, rng.randrange(0, max(1, usage)), usage,
                               bootstraps=False).chunks
            time.sleep(rng.random() * 0.05)
    finally:
        index.close()
    return {"evicted": chunks}


def main(argv: list[str]) -> int:
    role, *args = argv
    if role == "reader":
        result = reader(Path(args[0]), Path(args[1]), float(args[2]))
    elif role == "evictor":
        result = evictor(Path(args[0]), float(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown role {role}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
