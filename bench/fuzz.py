"""The fuzzer at scale: hostile images by the ten thousand, and the table the README shows.

    python -m bench.fuzz [--cases 10000] [--fuse-mounts 300] [--kernel-mounts 100]
                         [--seed 1] [--work DIR] [--out results/fuzz.json]

The cases are those of ``tests/test_fuzz.py`` (``tests.helpers.fuzzing``: the
seed image with its bootstrap (80 %), manifest, source config or source tar
mutated and every digest re-sealed). ``--cases`` run in process: ``rafs
check``, the daemon's loading path and every file and blob file read through
the real adapters, cache and fetcher, no kernel. Then ``--fuse-mounts`` more
cases go through ``rafs mount`` in fuse mode, and ``--kernel-mounts`` cases
the validator accepted through kernel mode, each tree read by a separate
process with a timeout and torn down (a reader still waiting is a hang: its
FUSE connection is aborted). Prints the table (per mode: cases tried, refused
with one line, mounted and read, hangs, tracebacks, wrong bytes, reads
answered EIO) and lists every failing case with what to replay it from.
Needs root and /dev/fuse for the mounted part (``--fuse-mounts 0
--kernel-mounts 0`` to skip it).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import fuzzing


def run(args: argparse.Namespace) -> fuzzing.Tally:
    work = Path(args.work or tempfile.mkdtemp(prefix="rafs-fuzz-"))
    shutil.rmtree(work, ignore_errors=True)
    seed = fuzzing.Seed.build(work / "seed")
    cases = work / "cases"
    tally = fuzzing.Tally()
    started = time.monotonic()

    def one(number: int, rng: random.Random, mode: str, target: str | None = None) -> bool:
        case = fuzzing.make_case(seed, number, rng, cases, target)
        try:
            if mode == "inprocess":
                tally.add(fuzzing.run_inprocess(seed, case, cases))
                return True
            if mode == "kernel" and not fuzzing.run_inprocess(seed, case, cases).validated:
                return False
            tally.add(fuzzing.run_mounted(seed, case, cases, mode))
            return True
        finally:
            fuzzing.cleanup_case(case, cases)

    rng = random.Random(args.seed)
    for number in range(args.cases):
        one(number, rng, "inprocess")
        if number % 500 == 499:
            print(f"{number + 1} cases in process, {time.monotonic() - started:.0f}s",
                  file=sys.stderr, flush=True)
    rng = random.Random(args.seed + 1)
    for number in range(args.fuse_mounts):
        one(args.cases + number, rng, "fuse")
    rng = random.Random(args.seed + 2)
    number, done = 0, 0
    while done < args.kernel_mounts:
        done += one(args.cases + args.fuse_mounts + number, rng, "kernel", "bootstrap")
        number += 1
    shutil.rmtree(work, ignore_errors=True)
    tally.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz")
    parser.add_argument("--cases", type=int, default=10_000, help="in-process cases")
    parser.add_argument("--fuse-mounts", type=int, default=300)
    parser.add_argument("--kernel-mounts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", help="scratch directory (default: a new temp dir)")
    parser.add_argument("--out", default="results/fuzz.json")
    args = parser.parse_args(argv)
    tally = run(args)
    print(tally.table())
    print(f"\n{tally.seconds:.0f} s, seed {args.seed}")  # type: ignore[attr-defined]
    for o in tally.failures:
        print(f"FAIL case {o.case} ({o.target}, {o.mode}, seed {args.seed}): {o.description}: "
              f"{'; '.join(o.problems())[:300]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "rows": tally.rows,
                               "seconds": round(tally.seconds, 1),  # type: ignore[attr-defined]
                               "failures": [o.__dict__ for o in tally.failures]},
                              indent=2, default=str) + "\n")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
