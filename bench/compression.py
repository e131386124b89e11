"""Chunk compression: zstd levels, long-distance matching and trained dictionaries,
for blob size and for start-up bytes.

    python -m bench.compression [--images numpy gcc postgres] [--levels 1 3 6 9 12 19]
                                [--sample 0.25] [--work DIR] [--out results]

Owns: for each image (``bench.corpus``, parent directory entries added as in
``rafs bench``), ``rafs optimize`` with the image's workload into a scratch OCI
layout, then every chunk of the result decoded, and for each way of compressing
chunks one at a time (as a blob must, to be read chunk by chunk):

- the **blob bytes**: every chunk compressed alone (raw when that is not
  smaller), over a deterministic sample of the chunks (``--sample``, every
  chunk whose sha256 falls in that fraction) scaled to the whole image;
- the **start-up bytes**: the chunks of the image's start-up set (the bootstrap's
  prefetch ranges), all of them; with a dictionary, plus the dictionary itself
  zstd-compressed (it travels in the bootstrap, fetched before the first read);
- the **speed**: uncompressed MB per second of one core's CPU time
  (``time.process_time``) over the sample.

Dictionaries are trained per blob (``zstandard.train_dictionary``, fastCover
with fixed parameters) on that blob's small chunks (at most ``--small`` bytes)
and used for those only: ``dict-startup`` on and for the small chunks of the
start-up set (what ``rafs convert --dictionary`` does), ``dict-all`` on and for
every small chunk of the blob. JSON and a markdown table land in ``--out``
(``compression.json``, ``compression.md``). Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard

from bench import corpus
from bench.tools import REPO

MB = 1e6
DEFAULT_IMAGES = ("numpy", "gcc", "postgres")
DEFAULT_LEVELS = (1, 3, 6, 9, 12, 19)


@dataclass
class Row:
    image: str
    method: str
    blob_bytes: int
    startup_bytes: int
    mb_per_s: float  # uncompressed MB per CPU second, one core
    extra_bytes: int = 0  # dictionaries (compressed), counted in startup_bytes


@dataclass
class ImageChunks:
    name: str
    blobs: list[list[tuple[bytes, bool]]]  # per blob: (data, in the start-up set)
    sample: list[tuple[int, bytes, bool]] = field(default_factory=list)  # (blob, data, startup)
    total_bytes: int = 0  # uncompressed, every chunk
    sample_bytes: int = 0


def _progress(msg: str) -> None:
    print(f"bench.compression: {msg}", file=sys.stderr, flush=True)


def optimized_image(name: str, work: Path) -> str:
    """``rafs optimize`` of corpus image ``name`` into ``work``; its oci: reference."""
    spec = corpus.IMAGES[name]
    layout, tag = corpus.with_parent_dirs(*spec.build(None))
    ref = f"oci:{work / name}:optimized"
    env_root = work / f"rafs-{name}"
    _progress(f"{name}: rafs optimize -- {shlex.join(spec.workload)}")
    subprocess.run([sys.executable, "-m", "runtime.cli", "optimize", f"oci:{layout}:{tag}", ref,
                    "--", *spec.workload], cwd=REPO, check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
                        "RAFS_ROOT": str(env_root / "root"),
                        "RAFS_RUN_DIR": str(env_root / "run")})
    return ref


def load_chunks(name: str, ref: str, sample: float) -> ImageChunks:
    from rafs.bootstrap import Bootstrap
    from rafs.codec import decode_chunk
    from rafs.image import open_local_image

    image = open_local_image(ref)
    boot = Bootstrap.from_bytes(image.bootstrap)
    startup = set(boot.prefetch_chunks())
    out = ImageChunks(name, [])
    cut = int(sample * (1 << 32))
    for k, blob in enumerate(boot.blobs):
        with image.open_blob(blob.digest) as f:
            raw = f.read()
        chunks = []
        for i in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
            c = boot.chunk(i)
            data = decode_chunk(c, raw[c.compressed_offset:c.compressed_offset + c.compressed_size],
                                boot.dictionary(k))
            chunks.append((data, i in startup))
            out.total_bytes += len(data)
            if int.from_bytes(c.sha256[:4], "big") < cut:
                out.sample.append((k, data, i in startup))
                out.sample_bytes += len(data)
        out.blobs.append(chunks)
    return out


def _alone(compress: Callable[[bytes], bytes], data: bytes) -> int:
    return min(len(compress(data)), len(data))


def measure(img: ImageChunks, name: str, make: Callable[[], zstandard.ZstdCompressor]) -> Row:
    cctx = make()
    t0 = time.process_time()
    sampled = sum(_alone(cctx.compress, d) for _k, d, _s in img.sample)
    seconds = time.process_time() - t0
    startup = sum(_alone(cctx.compress, d) for chunks in img.blobs for d, s in chunks if s)
    return Row(img.name, name, round(sampled * img.total_bytes / max(img.sample_bytes, 1)),
               startup, img.sample_bytes / MB / max(seconds, 1e-9))


def measure_dict(img: ImageChunks, name: str, level: int, small: int, dict_size: int,
                 scope: str) -> Row:
    """Per blob: a dictionary trained on the small chunks in ``scope`` ("startup" or
    "all"), used for those; every other chunk alone at ``level``."""
    plain = zstandard.ZstdCompressor(level=level)
    startup = extra = 0
    seconds = 0.0
    sampled = 0
    for k, chunks in enumerate(img.blobs):
        samples = [d for d, s in chunks if len(d) <= small and (s or scope == "all")]
        cctx = plain
        if sum(map(len, samples)) >= 8 * dict_size:  # too little to learn from: no dictionary
            t0 = time.process_time()
            d = zstandard.train_dictionary(dict_size, samples, k=1024, d=8, level=level)
            seconds += time.process_time() - t0
            cctx = zstandard.ZstdCompressor(level=level, dict_data=d)
            extra += len(zstandard.ZstdCompressor(level=9).compress(d.as_bytes()))

        def uses_dict(data: bytes, in_startup: bool) -> bool:
            return len(data) <= small and (in_startup or scope == "all")

        for d, s in chunks:
            if s:
                startup += _alone((cctx if uses_dict(d, s) else plain).compress, d)
        t0 = time.process_time()
        for blob, d, s in img.sample:
            if blob == k:
                sampled += _alone((cctx if uses_dict(d, s) else plain).compress, d)
        seconds += time.process_time() - t0
    return Row(img.name, name, round(sampled * img.total_bytes / max(img.sample_bytes, 1)),
               startup + extra, img.sample_bytes / MB / max(seconds, 1e-9), extra)


def run(images: list[str], levels: list[int], sample: float, small: int, dict_size: int,
        work: Path) -> list[Row]:
    rows: list[Row] = []
    for name in images:
        ref = optimized_image(name, work)
        img = load_chunks(name, ref, sample)
        startup_mb = sum(len(d) for chunks in img.blobs for d, s in chunks if s) / MB
        _progress(f"{name}: {img.total_bytes / MB:.1f} MB in chunks ({img.sample_bytes / MB:.1f}"
                  f" MB sampled), start-up set {startup_mb:.1f} MB")
        for level in levels:
            rows.append(measure(img, f"level {level}", lambda lv=level: zstandard.ZstdCompressor(
                level=lv)))
            _progress(f"{name}: {rows[-1]}")
        for level in (3, 19):
            if level in levels:
                params = zstandard.ZstdCompressionParameters.from_level(
                    level, enable_ldm=True, window_log=20)
                rows.append(measure(img, f"level {level} + ldm",
                                    lambda p=params: zstandard.ZstdCompressor(
                                        compression_params=p)))
                _progress(f"{name}: {rows[-1]}")
        for level in (3, 19):
            for scope in ("startup", "all"):
                rows.append(measure_dict(img, f"level {level} + dict-{scope}", level, small,
                                         dict_size, scope))
                _progress(f"{name}: {rows[-1]}")
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| Image | Method | Blob MB | vs level 3 | Start-up MB (dict incl.) | vs level 3 "
             "| MB/s per core |", "|---|---|---:|---:|---:|---:|---:|"]
    base = {r.image: r for r in rows if r.method == "level 3"}
    for r in rows:
        b = base.get(r.image)
        lines.append(
            f"| {r.image} | {r.method} | {r.blob_bytes / MB:.1f} | "
            f"{r.blob_bytes / b.blob_bytes:.3f} | {r.startup_bytes / MB:.2f} | "
            f"{r.startup_bytes / b.startup_bytes:.3f} | {r.mb_per_s:.0f} |" if b else
            f"| {r.image} | {r.method} | {r.blob_bytes / MB:.1f} | | "
            f"{r.startup_bytes / MB:.2f} | | {r.mb_per_s:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES),
                    choices=sorted(corpus.IMAGES))
    ap.add_argument("--levels", nargs="+", type=int, default=list(DEFAULT_LEVELS))
    ap.add_argument("--sample", type=float, default=0.25,
                    help="fraction of the chunks the blob bytes and speed are measured on")
    ap.add_argument("--small", type=int, default=16 << 10,
                    help="chunks up to this size use the dictionary (default 16 KiB)")
    ap.add_argument("--dict-size", type=int, default=112 << 10)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rafs-compression-", dir=args.work) as tmp:
        rows = run(args.images, args.levels, args.sample, args.small, args.dict_size, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.json").write_text(json.dumps(
        {"sample": args.sample, "small": args.small, "dict_size": args.dict_size,
         "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    md = table(rows)
    (args.out / "compression.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
