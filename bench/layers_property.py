"""The layer property test, long: thousands of random layer stacks through all four trees.

    python -m bench.layers_property [--examples 5000] [--per-image 40] [--seed 1000]
                                    [--modes fuse,kernel] [--work DIR] [--out FILE]

The same check as ``tests/test_convert_property.py`` (``tests.helpers.layerprop``:
the fuse mount, the kernel mount, the eager unpack and ``umoci raw unpack`` of
each random image must agree field by field), with more cases: ``--examples``
cases drawn from seeds ``--seed``, ``--seed + 1``, ... (``--per-image`` cases per
seed, side by side in one image). Prints progress and, for every disagreement,
the case that shows it (seed and index reproduce it); writes a JSON summary to
``--out``. Exits 1 if any case disagrees. Needs root, umoci and /dev/fuse
(kernel mode: a kernel with file-backed EROFS). Does not drop caches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.layerprop import Outcome, cases_from_seeds, check_cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layers_property", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=5000, help="cases in all (default 5000)")
    p.add_argument("--per-image", type=int, default=40, help="cases per seed and image")
    p.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    p.add_argument("--modes", default="fuse,kernel", help="mount modes (default fuse,kernel)")
    p.add_argument("--work", type=Path, help="scratch directory (default: a new temp dir)")
    p.add_argument("--out", type=Path, default=Path("results/layers_property.json"))
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="rafs-layers-", dir=args.work))
    if "RAFS_RUN_DIR" not in os.environ:
        (work / "run").mkdir()
        os.environ["RAFS_RUN_DIR"] = str(work / "run")
    total = Outcome()
    started = time.monotonic()
    seeds = range(args.seed, args.seed + -(-args.examples // args.per_image))
    try:
        for n, seed in enumerate(seeds):
            count = min(args.per_image, args.examples - n * args.per_image)
            cases = cases_from_seeds([seed], args.per_image)[:count]
            out = check_cases(cases, work / f"seed{seed}", f"seed {seed} case", modes)
            for name in ("cases", "batched", "alone", "refused", "images"):
                setattr(total, name, getattr(total, name) + getattr(out, name))
            total.differences += out.differences
            for d in out.differences:
                print(d, flush=True)
            elapsed = time.monotonic() - started
            print(f"seed {seed}: {total.cases}/{args.examples} cases, "
                  f"{len(total.differences)} disagreeing, {elapsed:.0f}s", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    summary = {"cases": total.cases, "batched": total.batched, "alone": total.alone,
               "refused": total.refused, "images": total.images,
               "disagreeing": len(total.differences), "seconds": round(elapsed, 1),
               "cases_per_second": round(total.cases / elapsed, 2) if elapsed else None,
               "first_seed": args.seed, "per_image": args.per_image, "modes": modes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 1 if total.differences else 0


if __name__ == "__main__":
    sys.exit(main())
