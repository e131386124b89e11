"""What the command line prints for scripts and people: ``--json``, ``REF@DIGEST``,
``-v`` levels, ``--keep-mounted``'s mount point, the push check before converting,
and ``rafs image ls|prune`` of the plain images ``rafs run`` unpacked.

Real commands as subprocesses, real registries, real mounts and runc; each test
cleans up what it started.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import corpus
from rafs.oci import OCILayout
from tests.helpers.mounts import REPO_ROOT, is_mounted, rafs_cmd, rafs_mounts
from tests.helpers.ocibuild import build_oci_image, file_entry
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private runtime root and run directory for this module's commands."""
    base = tmp_path_factory.mktemp("cli-output")
    return {"RAFS_ROOT": str(base / "root"), "RAFS_RUN_DIR": str(base / "run"),
            "PYTHONPATH": str(REPO_ROOT)}


def rafs(env: dict[str, str], *args: str | os.PathLike[str],
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run(rafs_cmd(*args), env=env, timeout=timeout)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("small") / "layout"
    build_oci_image(layout, "v1", [[file_entry("etc/hostname", b"out\n"),
                                    file_entry("data", os.urandom(200_000))],
                                   [file_entry("more", os.urandom(50_000))]])
    return f"oci:{layout}:v1"


def test_convert_json_says_what_was_written(small: str, tmp_path: Path,
                                            state: dict[str, str]) -> None:
    res = rafs(state, "convert", "--json", small, f"oci:{tmp_path}/out:v1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    layout = OCILayout(tmp_path / "out")
    manifest = layout.resolve("v1")
    assert out["reference"] == f"oci:{tmp_path}/out:v1"
    assert out["digest"] == out["manifest"]["digest"] == manifest.digest
    assert out["manifest"]["size"] == len(manifest.raw)
    assert [b["digest"] for b in out["blobs"]] + [out["bootstrap"]["digest"]] == [
        d.digest for d in manifest.layers]
    for desc in (*out["blobs"], out["bootstrap"], out["config"]):
        assert layout.blob_path(desc["digest"]).stat().st_size == desc["size"]
    assert out["source"] == small and out["chunks"] > 0

    res = rafs(state, "check", "--json", f"oci:{tmp_path}/out:v1")
    assert res.returncode == 0, res.stderr
    checked = json.loads(res.stdout)
    assert checked["ok"] is True and checked["manifest_digest"] == manifest.digest
    assert checked["blobs"] == len(out["blobs"]) and checked["chunks"] > 0

    res = rafs(state, "convert", small, f"oci:{tmp_path}/out2:v1")  # the text form
    digest = OCILayout(tmp_path / "out2").resolve("v1").digest
    assert res.stdout == f"oci:{tmp_path}/out2:v1@{digest}\n"


def test_verbosity_after_the_subcommand_and_http_lines(small: str, tmp_path: Path,
                                                      state: dict[str, str],
                                                      registry) -> None:
    ref = registry.ref("cli/verbose", "v1")
    assert rafs(state, "convert", small, ref).returncode == 0
    quiet = rafs(state, "inspect", ref)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    info = rafs(state, "convert", small, f"oci:{tmp_path}/v:v1", "-v")  # after it counts
    assert "converter.convert INFO converted" in info.stderr, info.stderr
    assert "HTTP" not in info.stderr and "DEBUG" not in info.stderr, info.stderr
    both = rafs(state, "-v", "inspect", "-v", ref)  # and adds up with one before it
    requests = [line for line in both.stderr.splitlines() if "HTTP Request:" in line]
    assert requests, both.stderr
    assert all(" GET " in line or " HEAD " in line for line in requests), requests
    assert "httpcore" not in both.stderr
    deep = rafs(state, "inspect", "-vvv", ref)
    assert "httpcore" in deep.stderr


def test_convert_checks_push_access_before_converting(small: str, registry_basic,
                                                      state: dict[str, str],
                                                      tmp_path: Path) -> None:
    registry_basic.server.mark()
    res = rafs(state, "convert", "--creds", f"{registry_basic.user}:wrong", small,
               registry_basic.ref("cli/denied", "v1"))
    message = assert_clean_error(res)
    assert f"push to {registry_basic.host}/cli/denied" in message
    log = registry_basic.server.access_log(since_mark=True)
    assert log and all(r.method == "POST" and "/blobs/uploads/" in r.uri for r in log), log
    # with the right credentials it converts and pushes
    res = rafs(state, "convert", "--json", "--creds", registry_basic.creds, small,
               registry_basic.ref("cli/denied", "v1"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["reference"] == registry_basic.ref("cli/denied", "v1")


# -- rafs run, rafs ps, rafs image -------------------------------------------------------


@pytest.fixture(scope="module")
def minbase(corpus_cache: Path) -> str:
    layout, tag = corpus.debian_minbase_image(corpus_cache)
    return f"oci:{layout}:{tag}"


@pytest.fixture
def containers(state: dict[str, str]) -> Iterator[None]:
    """Remove this test's containers and unpacks; fail if a mount is left."""
    yield
    names = rafs(state, "ps", "-q").stdout.split()
    if names:
        rafs(state, "rm", "-f", *names)
    rafs(state, "image", "prune", "--all")
    left = [m for m in rafs_mounts() if m.startswith(os.path.dirname(state["RAFS_ROOT"]))]
    assert left == [], left


def _unpacked(state: dict[str, str]) -> list[dict[str, object]]:
    res = rafs(state, "image", "ls", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_image_prune_removes_only_unused_unpacks(minbase: str, state: dict[str, str],
                                                 containers: None) -> None:
    res = rafs(state, "run", "--name", "keeper", minbase, "true")
    assert res.returncode == 0, res.stderr
    [entry] = _unpacked(state)
    assert entry["containers"] == ["keeper"] and entry["complete"] is True
    assert entry["bytes"] > 10 << 20
    # an exited container still uses its image: prune keeps it, --all does not
    assert rafs(state, "image", "prune").stdout.startswith("0 unpacked images removed")
    assert len(_unpacked(state)) == 1

    ps = json.loads(rafs(state, "ps", "--json").stdout)
    [row] = ps
    assert row["name"] == "keeper" and row["status"] == "exited (0)"
    assert row["exit_code"] == 0 and row["lazy"] is False
    assert row["digest"] == entry["digest"]

    # a running container's image is never removed, not even by --all
    proc = subprocess.Popen(rafs_cmd("run", "--name", "busy", minbase, "sleep", "600"),
                            env={**os.environ, **state}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_running(state, "busy")
        res = rafs(state, "image", "prune", "--all", "--json")
        assert res.returncode == 0 and json.loads(res.stdout) == [], res.stdout
        assert Path(str(entry["path"]), "rootfs").is_dir()
    finally:
        rafs(state, "rm", "-f", "busy")
        proc.wait(timeout=120)
    # the last user gone (rm'ed) but keeper is stopped: --all removes the unpack
    res = rafs(state, "image", "prune", "--all", "--json")
    assert [e["digest"] for e in json.loads(res.stdout)] == [entry["digest"]]
    assert _unpacked(state) == [] and not Path(str(entry["path"])).exists()
    rafs(state, "rm", "keeper")
    # and with no container at all, plain prune removes what a run unpacked
    assert rafs(state, "run", "--rm", minbase, "true").returncode == 0
    assert len(_unpacked(state)) == 1
    assert rafs(state, "image", "prune").stdout.startswith("removed sha256:")
    assert _unpacked(state) == []


def _wait_running(state: dict[str, str], name: str) -> None:
    import time

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        rows = json.loads(rafs(state, "ps", "--json").stdout)
        if any(r["name"] == name and r["status"] == "running" for r in rows):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} did not start")


def test_keep_mounted_says_where(minbase: str, tmp_path: Path, state: dict[str, str],
                                 containers: None) -> None:
    rafs_ref = f"oci:{tmp_path}/rafs:v1"
    assert rafs(state, "convert", minbase, rafs_ref).returncode == 0
    res = rafs(state, "run", "--rm", "--keep-mounted", rafs_ref, "true")
    assert res.returncode == 0, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rafs: the image stays mounted on "), res.stderr
    mnt = last.removeprefix("rafs: the image stays mounted on ").split(" ")[0]
    try:
        assert is_mounted(mnt)
        assert Path(mnt, "etc", "debian_version").is_file()
    finally:
        assert rafs(state, "umount", mnt).returncode == 0
    assert not is_mounted(mnt)
