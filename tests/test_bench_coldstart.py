"""`rafs bench`: the cold-start benchmark runs end to end on real parts and reports
every figure (no timing is asserted: the machine is shared).

The eStargz peer is used here only if it is built already (``--no-peer-build``):
building it takes apt packages and one to two minutes of ``go build``. ``make
bench-deps`` (or any ``rafs bench --against estargz``) builds and caches it;
``RAFS_TEST_BUILD_PEER=1`` makes this module build it first. Without it, the
eStargz test checks the other half of the contract instead: one line saying why
the peer did not run, and every other scenario's figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.coldstart import SCENARIOS, SUMMARY_KEYS
from bench.peers import estargz

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]

REPO = Path(__file__).resolve().parent.parent


def _rafs(*args: str, timeout: float = 900,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})


def _leftovers(work: Path) -> list[str]:
    """Mounts and processes of a benchmark run whose scratch dir was below ``work``
    (other benchmark runs on the machine have their own)."""
    needle = str(work)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if needle in line]
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle.encode() in (d / "cmdline").read_bytes():
                    procs.append(d.name)
            except OSError:
                pass
    return mounts + procs


def _tail(stderr: str) -> str:
    """The bench's own lines (daemons' log lines quoted in an error dropped)."""
    return "\n".join(line for line in stderr.splitlines() if "level=" not in line)[-3000:]


def _short_dir() -> Path:
    """A scratch parent short enough for the unix sockets the bench makes below it."""
    return Path(tempfile.mkdtemp(prefix="rbt-", dir="/var/tmp"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("bench")
    work = _short_dir()
    (out / "work").symlink_to(work)
    try:
        proc = _rafs("bench", "--quick", "--profile", "local", "--images", "minbase",
                     "--out", str(out), "--work", str(work))
        assert proc.returncode == 0, _tail(proc.stderr)
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_quick_bench_writes_every_figure_for_every_scenario(quick_run: Path) -> None:
    result = json.loads((quick_run / "coldstart.json").read_text())
    assert result["profiles"] == ["local"]
    assert set(result["versions"]) >= {"rafs", "containerd", "runc", "kernel", "python"}
    image = result["images"]["minbase"]
    assert image["workload"] == ["true"]
    assert set(image["layer_bytes"]) == {"oci", "rafs", "optimized"}
    assert image["unpacked_bytes"] > 0 and image["warm_s"] > 0
    profile = image["profiles"]["local"]
    assert set(profile["scenarios"]) == set(SCENARIOS)
    for scenario, data in profile["scenarios"].items():
        assert len(data["runs"]) == 1, scenario
        summary = data["summary"]
        for key in SUMMARY_KEYS:
            assert set(summary[key]) == {"median", "min", "max"}, (scenario, key)
            assert summary[key]["median"] >= 0, (scenario, key)
        assert summary["link_bytes"]["median"] > 0, scenario  # everything came over the link
        assert summary["requests"]["median"] >= summary["blob_requests"]["median"] >= 1
        run = data["runs"][0]
        if scenario in ("rafs-containerd", "rafs-containerd-optimized", "rafs-lazy",
                        "rafs-optimized"):
            assert run["mode"] in ("fuse", "kernel"), scenario
            assert run["fetched_bytes"] > 0 and "fuse_requests_by_op" in run, scenario
    # the eager paths move the whole image; the lazy ones a part of it
    oci = profile["scenarios"]["oci-containerd"]["summary"]["image_pct"]["median"]
    lazy = profile["scenarios"]["rafs-lazy"]["summary"]["image_pct"]["median"]
    assert oci >= 99 and lazy < 50
    # the optimized image fetches less than the lazy one, through either path
    for lazy_s, opt_s in (("rafs-lazy", "rafs-optimized"),
                          ("rafs-containerd", "rafs-containerd-optimized")):
        assert (profile["scenarios"][opt_s]["summary"]["link_bytes"]["median"]
                < profile["scenarios"][lazy_s]["summary"]["link_bytes"]["median"])
    bound = profile["bound"]
    assert bound["total_s"] >= bound["warm_s"] > 0
    assert bound["needed_bytes"] > 0 and bound["metadata_bytes"] > 0
    assert bound["metadata_by_format"]["rafs"] == bound["metadata_bytes"]  # no eStargz here
    assert len(image["warm_runs"]) == len(image["warm_containerd_runs"]) == 3


def test_quick_bench_writes_the_table_and_the_plot(quick_run: Path) -> None:
    table = (quick_run / "coldstart.md").read_text()
    for scenario in (*SCENARIOS, "bound"):
        assert f"| minbase | local | {scenario} |" in table
    png = quick_run / "coldstart-local.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bench_leaves_no_mount_or_process_behind(quick_run: Path) -> None:
    work = (quick_run / "work").resolve()
    assert work.is_dir()  # the scratch dir went below it, and is gone:
    assert list(work.iterdir()) == []
    assert _leftovers(work) == []


def test_bench_rejects_zero_samples_with_one_line() -> None:
    proc = _rafs("bench", "--samples", "0", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "rafs: error: --samples must be at least 1"


@pytest.fixture(scope="module")
def peer_cache() -> Path | None:
    """The built eStargz peer, or None; built first with RAFS_TEST_BUILD_PEER=1."""
    if os.environ.get("RAFS_TEST_BUILD_PEER") == "1":
        estargz.build_peer()
    return estargz.cached_peer()


def test_bench_against_estargz_runs_the_peer_or_says_in_one_line_why_not(
        peer_cache: Path | None, tmp_path: Path) -> None:
    work = _short_dir()
    try:
        _against_estargz(peer_cache, tmp_path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _against_estargz(peer_cache: Path | None, tmp_path: Path, work: Path) -> None:
    proc = _rafs("bench", "--quick", "--profile", "local", "--images", "minbase",
                 "--against", "estargz", "--no-peer-build", "--scenarios", "estargz-lazy",
                 "estargz-optimized", "rafs-lazy", "--out", str(tmp_path),
                 "--work", str(work))
    assert proc.returncode == 0, _tail(proc.stderr)
    result = json.loads((tmp_path / "coldstart.json").read_text())
    profile = result["images"]["minbase"]["profiles"]["local"]
    assert "rafs-lazy" in profile["scenarios"]  # the rest runs either way
    if peer_cache is None:
        skipped = [line for line in proc.stderr.splitlines() if "eStargz" in line]
        assert skipped == [f"bench: eStargz scenarios skipped: the eStargz peer is not "
                           f"built in {estargz.peer_dir()} and --no-peer-build was given"]
        assert set(profile["scenarios"]) == {"rafs-lazy"}
        assert "estargz" in result["skipped"]
        return
    assert result["skipped"] == {}
    assert set(profile["scenarios"]) == {"estargz-lazy", "estargz-optimized", "rafs-lazy"}
    image = result["images"]["minbase"]
    assert set(image["layer_bytes"]) >= {"estargz", "estargz-optimized"}
    for scenario, form in (("estargz-lazy", "estargz"),
                           ("estargz-optimized", "estargz-optimized")):
        run = profile["scenarios"][scenario]["runs"][0]
        assert run["remote_layers"] >= 1, scenario  # mounted lazily, not pulled whole
        assert 0 < run["link_bytes"] < image["layer_bytes"][form] / 2, scenario
        assert run["blob_requests"] >= 1, scenario
    assert 0 < image["metadata_bytes"]["estargz"] < image["layer_bytes"]["estargz"]
    assert result["versions"]["estargz stargz-snapshotter library"] != "not installed"
    table = (tmp_path / "coldstart.md").read_text()
    assert "| minbase | local | estargz-lazy |" in table
    assert _leftovers(work) == []


def test_peer_unavailable_is_one_line_without_go(tmp_path: Path) -> None:
    """Without a Go toolchain on PATH and no cached peer, the build says so in one line."""
    env = {"PATH": str(tmp_path), "RAFS_PEER_CACHE": str(tmp_path / "peers")}
    code = ("from bench.peers import estargz\n"
            "try:\n    estargz.build_peer(install=False)\n"
            "except estargz.PeerUnavailable as e:\n    print(e)\n")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": pythonpath, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cannot build the eStargz peer: ")
    assert proc.stdout.count("\n") == 1


def test_bench_refuses_a_work_dir_too_long_for_its_sockets_in_one_line() -> None:
    long = "/var/tmp/" + "w" * 80
    proc = _rafs("bench", "--quick", "--work", long, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"rafs: error: --work {long}: too long a path")
    assert len(proc.stderr.strip().splitlines()) == 1
