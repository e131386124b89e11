"""The fuzzer in ``make test``: a few hundred hostile images, every one answered rightly.

Each case is the seed image (tests/helpers/fuzzing.py) with its bootstrap,
manifest, source config or source tar mutated and every digest re-sealed, so
the trust chain holds. In process (the bulk): ``rafs check``, the daemon's
loading path, and every file and blob file read through the real adapters,
cache and fetcher. Mounted: ``rafs mount`` in fuse mode for a sample of every
kind, kernel mode for cases the validator accepted, each tree read with a
timeout and torn down. Nothing may hang, print a traceback, serve a byte the
bootstrap does not vouch for, or leave a mount or a process behind; refusals
are one line. ``python -m bench.fuzz`` runs the same cases by the ten thousand.

``RAFS_FUZZ_SEED`` picks other cases (the default is fixed, so a failure
replays).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.helpers import fuzzing
from tests.helpers.mounts import rafs_mounts

SEED = int(os.environ.get("RAFS_FUZZ_SEED", "18"))
IN_PROCESS = 300
FUSE_MOUNTS = 24
KERNEL_MOUNTS = 8


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> fuzzing.Seed:
    return fuzzing.Seed.build(tmp_path_factory.mktemp("fuzz-seed"))


def _report(tally: fuzzing.Tally) -> str:
    lines = [tally.table()]
    for o in tally.failures[:10]:
        lines.append(f"case {o.case} ({o.target}, {o.mode}): {o.description}: "
                     f"{'; '.join(o.problems())[:500]}")
    return "\n".join(lines)


def _nothing_left(root: Path) -> None:
    left = [mp for mp in rafs_mounts() if mp.startswith(str(root))]
    assert not left, f"mounts left behind: {left}"


def test_hundreds_of_hostile_images_in_process(seed, tmp_path):
    rng = random.Random(SEED)
    tally = fuzzing.Tally()
    for number in range(IN_PROCESS):
        case = fuzzing.make_case(seed, number, rng, tmp_path)
        try:
            tally.add(fuzzing.run_inprocess(seed, case, tmp_path))
        finally:
            fuzzing.cleanup_case(case, tmp_path)
    row = tally.rows["inprocess"]
    assert not tally.failures, _report(tally)
    assert row["tried"] == IN_PROCESS
    assert row["refused"] + row["read"] == IN_PROCESS, _report(tally)
    assert row["refused"] > 50 and row["read"] > 50, _report(tally)  # both paths exercised


@pytest.mark.fuse
def test_hostile_images_mounted_in_fuse_mode(seed, tmp_path):
    rng = random.Random(SEED + 1)
    tally = fuzzing.Tally()
    for number in range(FUSE_MOUNTS):
        target = fuzzing.TARGETS[number % len(fuzzing.TARGETS)] if number < 8 else None
        case = fuzzing.make_case(seed, number, rng, tmp_path, target)
        try:
            tally.add(fuzzing.run_mounted(seed, case, tmp_path, "fuse"))
        finally:
            fuzzing.cleanup_case(case, tmp_path)
    assert not tally.failures, _report(tally)
    row = tally.rows["fuse"]
    assert row["refused"] and row["read"], _report(tally)
    _nothing_left(tmp_path)


def test_validated_hostile_images_mounted_in_kernel_mode(seed, tmp_path):
    rng = random.Random(SEED + 2)
    tally = fuzzing.Tally()
    number = 0
    while tally.rows.get("kernel", {}).get("tried", 0) < KERNEL_MOUNTS:
        case = fuzzing.make_case(seed, number, rng, tmp_path, "bootstrap")
        number += 1
        try:
            if fuzzing.run_inprocess(seed, case, tmp_path).validated:
                tally.add(fuzzing.run_mounted(seed, case, tmp_path, "kernel"))
        finally:
            fuzzing.cleanup_case(case, tmp_path)
        assert number < 50 * KERNEL_MOUNTS, "the validator accepts almost nothing"
    assert not tally.failures, _report(tally)
    _nothing_left(tmp_path)


@pytest.mark.fuse
@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_the_fuzzer_sees_a_hang_and_still_cleans_up(seed, tmp_path, mode, monkeypatch):
    """A daemon that never answers (stopped with SIGSTOP): the reader is a hang, the FUSE
    connection is aborted, the daemon killed, and nothing is left."""
    monkeypatch.setattr(fuzzing, "READ_LIMIT", 5.0)
    case = fuzzing.Case(0, "none", "unmutated", f"oci:{seed.rafs}:v1")
    out = fuzzing.run_mounted(seed, case, tmp_path, mode, freeze_daemon=True)
    assert out.hang and "reading the tree" in out.hang[0]
    _nothing_left(tmp_path)
    assert not list(tmp_path.glob("case0-*"))
