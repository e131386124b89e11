"""`rafs bench`: the cold-start benchmark runs end to end on real parts and reports
every figure (no timing is asserted: the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.coldstart import PHASES, SCENARIOS

REPO = Path(__file__).resolve().parent.parent


def _rafs(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def _leftovers() -> list[str]:
    """Mounts and processes of a benchmark run (its work dirs are named rafs-coldstart-)."""
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if "rafs-coldstart-" in line]
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"rafs-coldstart-" in (d / "cmdline").read_bytes():
                    procs.append(d.name)
            except OSError:
                pass
    return mounts + procs


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = _rafs("bench", "--quick", "--profile", "local", "--images", "minbase",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


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
        for key in (*PHASES, "total_s", "link_bytes", "image_pct"):
            assert set(summary[key]) == {"median", "min", "max"}, (scenario, key)
            assert summary[key]["median"] >= 0, (scenario, key)
        assert summary["link_bytes"]["median"] > 0, scenario  # everything came over the link
        run = data["runs"][0]
        if scenario in ("rafs-containerd", "rafs-lazy", "rafs-optimized"):
            assert run["mode"] in ("fuse", "kernel"), scenario
            assert run["fetched_bytes"] > 0 and "fuse_requests_by_op" in run, scenario
    # the eager paths move the whole image; the lazy ones a part of it
    oci = profile["scenarios"]["oci-containerd"]["summary"]["image_pct"]["median"]
    lazy = profile["scenarios"]["rafs-lazy"]["summary"]["image_pct"]["median"]
    assert oci >= 99 and lazy < 50
    ideal = profile["ideal"]
    assert ideal["total_s"] >= ideal["warm_s"] > 0


def test_quick_bench_writes_the_table_and_the_plot(quick_run: Path) -> None:
    table = (quick_run / "coldstart.md").read_text()
    for scenario in (*SCENARIOS, "ideal"):
        assert f"| minbase | local | {scenario} |" in table
    png = quick_run / "coldstart-local.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bench_leaves_no_mount_or_process_behind(quick_run: Path) -> None:
    assert _leftovers() == []


def test_bench_rejects_zero_samples_with_one_line() -> None:
    proc = _rafs("bench", "--samples", "0", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "rafs: error: --samples must be at least 1"
