"""Churn on a node: 50 cycles of pull + run + remove while containerd and the snapshotter
are SIGKILLed at random places, and half of the cycles also wipe containerd's state.

A real containerd and ``rafs snapshotter`` (``tests.helpers.containerd``), the
Debian minbase image converted to RAFS in the real registry. Each cycle: maybe
wipe containerd (killed with its shims, root and state removed, started again),
then at one random place (before the pull, during it, after it, after the run,
after the removal) SIGKILL the snapshotter, containerd or both and start them
again. A pull that our own kill interrupted is retried once; every other pull
must succeed first time. In the end, once containerd's GC has run: no failed
pull, and no rafs mount, daemon, daemon socket, blob mount or snapshot left.

The seed is ``$RAFS_CHURN_SEED`` (default fixed) and is printed with any failure.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.containerd import (
    RAFS_FSTYPES,
    Containerd,
    SnapshotterProcess,
    containerd_daemon,
    mounts_under,
    snapshotter_process,
    unmount_under,
)
from tests.helpers.mounts import daemon_pids

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]

CYCLES = 50
SEED = int(os.environ.get("RAFS_CHURN_SEED", "20261203"))
PLACES = ("before-pull", "during-pull", "after-pull", "after-run", "after-remove")
VICTIMS = ("snapshotter", "containerd", "both")


@pytest.fixture(scope="module")
def minbase_ref(registry, corpus_cache: Path) -> str:  # type: ignore[no-untyped-def]
    from bench import corpus
    from converter.convert import ConvertOptions, convert

    src, tag = corpus.debian_minbase_image(corpus_cache)
    ref = registry.ref("churn/minbase", "rafs")
    convert(f"oci:{src}:{tag}", ref, ConvertOptions(progress=False))
    return ref.removeprefix("docker://")


@dataclass
class Node:
    cd: Containerd
    sn: SnapshotterProcess
    base: Path
    events: list[str] = field(default_factory=list)
    probes: int = 0

    def restart(self, victim: str) -> None:
        if victim in ("snapshotter", "both"):
            self.sn.kill()
        if victim in ("containerd", "both"):
            self.cd.kill()
        if victim in ("snapshotter", "both"):
            self.sn.start()
        if victim in ("containerd", "both"):
            self.cd.start()
        self.reconnected()

    def reconnected(self, timeout: float = 180) -> float:
        """Until containerd's gRPC channel to the snapshotter works again (seconds waited).
        ``snapshot ls`` is answered from containerd's own metadata: prepare and remove
        a snapshot, which reaches the snapshotter."""
        start = time.monotonic()
        while True:
            self.probes += 1
            key = f"probe-{self.probes}"
            res = self.cd.ctr("snapshot", "--snapshotter", "rafs", "prepare", key, "",
                              check=False)
            if res.returncode == 0:
                self.cd.ctr("snapshot", "--snapshotter", "rafs", "rm", key, check=False)
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, \
                f"containerd did not reconnect: {res.stderr}"
            time.sleep(0.2)

    def wipe(self) -> None:
        self.cd.wipe()
        self.cd.start()
        self.reconnected()

    def pull(self, image: str) -> subprocess.CompletedProcess[str]:
        return self.cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "rafs",
                                  image, check=False, timeout=180)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    sock = tmp_path / "sn.sock"
    try:
        with snapshotter_process(sock, tmp_path / "snroot", tmp_path / "sn.log") as sn, \
                containerd_daemon(tmp_path / "containerd", sock, namespace="churn") as cd:
            yield Node(cd, sn, tmp_path)
    finally:
        unmount_under(tmp_path)


def run_dir_leftovers(snroot: Path) -> list[str]:
    """Daemon instances, sockets and blob mounts of the run directory serving ``snroot``."""
    import json

    out = []
    mounts = Path(os.environ["RAFS_RUN_DIR"]) / "mounts"
    for d in mounts.iterdir() if mounts.exists() else []:
        if not d.is_dir():
            continue
        try:
            mp = json.loads((d / "state.json").read_text()).get("mountpoint", "")
        except (OSError, ValueError):
            mp = ""
        if mp.startswith(f"{snroot}/") or not mp:
            out += [f"instance {d.name} of {mp or '?'}"]
            out += [f"socket {p}" for p in d.glob("sock")]
            out += [f"blob mount {mp}" for mp, _ in mounts_under(d / "blobs")]
    return out


def daemons_of(snroot: Path) -> list[int]:
    return daemon_pids(snroot)


def pull_during_kill(node: Node, image: str, victim: str, delay: float
                     ) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Pull while ``victim`` is SIGKILLed after ``delay``; start what died, and pull
    once more if our kill broke the pull. (result, whether it was retried)"""
    def kill() -> None:
        if victim in ("snapshotter", "both"):
            node.sn.kill()
        if victim in ("containerd", "both"):
            node.cd.kill()

    timer = threading.Timer(delay, kill)
    timer.start()
    res = node.pull(image)
    timer.join()
    for proc, start_it in ((node.sn.proc, node.sn.start), (node.cd.proc, node.cd.start)):
        if proc is None or proc.poll() is not None:
            start_it()
    node.reconnected()
    if res.returncode == 0:
        return res, False
    return node.pull(image), True


def one_cycle(node: Node, image: str, cycle: int, rng: random.Random) -> tuple[list[str], bool]:
    """Pull, run, remove, with a kill at one random place; (failures, pull retried)."""
    wipe = cycle % 2 == 1
    place, victim = rng.choice(PLACES), rng.choice(VICTIMS)
    node.events.append(f"{cycle}: wipe={wipe} kill {victim} {place}")
    if wipe:
        node.wipe()
    if place == "before-pull":
        node.restart(victim)
    retried = False
    if place == "during-pull":
        res, retried = pull_during_kill(node, image, victim, rng.uniform(0.0, 1.0))
    else:
        res = node.pull(image)
    if res.returncode != 0:
        return [f"cycle {cycle} pull: {res.stderr.strip()[-300:]}"], retried
    failed = []
    if place == "after-pull":
        node.restart(victim)
    run = node.cd.ctr("run", "--rm", "--snapshotter", "rafs", image, f"churn-{cycle}",
                      "sh", "-c", "echo ran", check=False, timeout=180)
    if run.returncode != 0 or run.stdout.strip() != "ran":
        failed.append(f"cycle {cycle} run: {run.stderr.strip()[-300:]}")
    if place == "after-run":
        node.restart(victim)
    rm = node.cd.ctr("image", "rm", "--sync", image, check=False, timeout=180)
    if rm.returncode != 0:
        failed.append(f"cycle {cycle} rm: {rm.stderr.strip()[-300:]}")
    if place == "after-remove":
        node.restart(victim)
    return failed, retried


def test_churn_with_kills_and_wipes_leaks_nothing(node: Node, minbase_ref: str) -> None:
    rng = random.Random(SEED)
    snroot = node.base / "snroot"
    failed: list[str] = []
    retried = 0
    start = time.monotonic()
    for cycle in range(CYCLES):
        errors, again = one_cycle(node, minbase_ref, cycle, rng)
        failed += errors
        retried += again
    took = time.monotonic() - start
    # What a killed containerd forgot, its garbage collector removes on the next pass.
    node.cd.ctr("image", "rm", "--sync", minbase_ref, check=False)
    node.cd.ctr("content", "prune", "references", check=False)
    deadline = time.monotonic() + 60
    while (snaps := node.cd.ctr("snapshot", "--snapshotter", "rafs", "ls").stdout
           .splitlines()[1:]) and time.monotonic() < deadline:
        node.cd.ctr("image", "rm", "--sync", minbase_ref, check=False)
        time.sleep(1)
    where = f"(seed {SEED}; set RAFS_CHURN_SEED to replay)\n" + "\n".join(node.events)
    print(f"churn: {CYCLES} cycles in {took:.1f}s, {retried} pulls retried after our own "
          f"kill, seed {SEED}")
    assert failed == [], f"{len(failed)} failures {where}:\n" + "\n".join(failed)
    assert snaps == [], f"snapshots left {where}: {snaps}"
    rafs_left = [mp for mp, fs in mounts_under(snroot) if fs in RAFS_FSTYPES]
    assert rafs_left == [], f"rafs mounts left {where}: {rafs_left}"
    assert mounts_under(snroot) == [], f"mounts left {where}: {mounts_under(snroot)}"
    assert run_dir_leftovers(snroot) == [], f"run state left {where}"
    assert daemons_of(snroot) == [], f"daemons left {where}"
    assert not [p for p in (snroot / "snapshots").iterdir()
                if re.fullmatch(r"\d+", p.name)], f"snapshot directories left {where}"
