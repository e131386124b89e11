"""`rafs run`, `ps`, `rm` and `optimize` with real runc, real FUSE and real overlayfs.

One module-scoped pair of images: the Debian python3-numpy image (plain OCI)
and its RAFS conversion, tagged side by side in one private layout (so that
`rafs optimize` can find the RAFS image's original). Every test checks that it
leaves no mount, daemon or runc container behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.convert import convert
from rafs.oci import OCILayout
from runtime.imagemount import mount_dir_for
from tests.helpers.edgecases import LAYERS
from tests.helpers.mounts import rafs_cmd, read_stats
from tests.helpers.ocibuild import ImageConfig, build_oci_image, file_entry
from tests.helpers.procs import assert_clean_error, run
from tests.helpers.treecmp import compare_trees
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.fuse, pytest.mark.root]

NUMPY_CMD = ["python3", "-c", "import numpy; print(numpy.__version__)"]
RUN_DIR = Path(os.environ.get("RAFS_RUN_DIR", "/nonexistent"))


class Images:
    def __init__(self, layout: Path, plain_tag: str) -> None:
        self.layout = layout
        self.plain = f"oci:{layout}:{plain_tag}"
        self.rafs = f"oci:{layout}:rafs"
        manifest = OCILayout(layout).resolve("rafs")
        self.rafs_digest = manifest.digest
        self.rafs_blob_bytes = sum(d.size for d in manifest.layers[:-1])
        self.numpy_version = ""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rafs-root")


@pytest.fixture(scope="module")
def env(root: Path) -> dict[str, str]:
    return {"RAFS_ROOT": str(root), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@pytest.fixture(scope="module")
def images(debian_numpy_image: tuple[Path, str],
           tmp_path_factory: pytest.TempPathFactory) -> Images:
    src, tag = debian_numpy_image
    layout = tmp_path_factory.mktemp("images") / "layout"
    shutil.copytree(src, layout, copy_function=os.link)
    convert(f"oci:{layout}:{tag}", f"oci:{layout}:rafs")
    return Images(layout, tag)


def rafs(env: dict[str, str], *args: str | os.PathLike[str], timeout: float = 240,
         ) -> subprocess.CompletedProcess[str]:
    return run(rafs_cmd(*args), env=env, timeout=timeout)


def _ours(root: Path) -> tuple[str, ...]:
    return (str(root), str(RUN_DIR / "images"))


def leftovers(root: Path) -> list[str]:
    """Mounts under our directories (the run directory holds kernel mode's blob mounts
    too), our daemons, and runc containers of ours."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4]
        if mp.startswith((*_ours(root), str(RUN_DIR))):
            found.append(f"mount {mp}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        daemon = any(m in cmdline for m in ("fused.daemon", "fused.supervisor", "fused.worker"))
        if daemon and any(p in cmdline for p in _ours(root)):
            found.append(f"daemon {pid}: {cmdline}")
    runc_root = RUN_DIR / "runc"
    if runc_root.exists():
        found += [f"runc container {c}" for c in os.listdir(runc_root)]
    return found


@pytest.fixture
def clean(root: Path, env: dict[str, str]) -> Iterator[None]:
    """Fails the test if it leaves anything behind; removes its containers either way."""
    yield
    left = leftovers(root)
    names = rafs(env, "ps", "-q").stdout.split()
    if names:
        rafs(env, "rm", "-f", *names)
    for mnt in (RUN_DIR / "images").glob("*/mnt"):
        rafs(env, "umount", mnt)
    assert left == [], f"left behind: {left}"


def wait_until(predicate: object, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(env: dict[str, str], name: str) -> str:
    for line in rafs(env, "ps").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[3]
    return ""


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(rafs_cmd("run", *args), env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


# -- lazy runs ----------------------------------------------------------------------


def test_numpy_runs_lazily_and_fetches_far_less_than_the_image(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    cache = root / "cache-lazy"
    res = rafs(env, "run", "--rm", "--mode", "fuse", "--keep-mounted", "--cache-dir", cache,
               images.rafs, *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    version = res.stdout.strip()
    assert version.count(".") == 2 and version[0].isdigit(), res.stdout
    assert "not a RAFS image" not in res.stderr
    mnt = mount_dir_for(images.rafs_digest)
    stats = read_stats(mnt, env)["stats"]
    assert isinstance(stats, dict)
    fetched = stats["backend_bytes"]
    assert 0 < fetched < images.rafs_blob_bytes / 2, (fetched, images.rafs_blob_bytes)
    assert rafs(env, "umount", mnt).returncode == 0


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
def test_numpy_runs_in_each_mount_mode_and_the_image_goes_with_the_container(
        mode: str, images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    res = rafs(env, "run", "--rm", "--mode", mode, images.rafs, *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()[0].isdigit()
    assert leftovers(root) == []


def test_exit_status_of_the_container_is_passed_through(
        images: Images, env: dict[str, str], clean: None) -> None:
    res = rafs(env, "run", "--rm", images.rafs, "sh", "-c", "echo out; exit 7")
    assert res.returncode == 7, res.stderr
    assert res.stdout == "out\n"


def test_user_nobody_reads_the_image(images: Images, env: dict[str, str],
                                     clean: None) -> None:
    res = rafs(env, "run", "--rm", "-u", "nobody", images.rafs, "sh", "-c",
               "id -un; id -gn; grep -c . /usr/lib/os-release; " + " ".join(
                   f"'{a}'" for a in NUMPY_CMD))
    assert res.returncode == 0, res.stderr
    user, group, lines, version = res.stdout.split()
    assert (user, group) == ("nobody", "nogroup")
    assert int(lines) > 3 and version[0].isdigit()


def test_environment_workdir_and_hostname_come_from_image_and_flags(
        images: Images, env: dict[str, str], clean: None) -> None:
    res = rafs(env, "run", "--rm", "-e", "FOO=bar", "-w", "/usr/lib", "--net", "none",
               images.rafs, "sh", "-c",
               'echo "$FOO $LANG $HOME"; pwd; test "$(hostname)" = "$(cat /etc/hostname)" '
               '&& echo same; grep -c : /proc/net/dev; grep CapEff /proc/self/status')
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "bar C.UTF-8 /root"
    assert lines[1] == "/usr/lib"
    assert lines[2] == "same"
    assert lines[3] == "1"  # --net none: loopback only
    assert lines[4].split()[1] == "00000000a80425fb"  # containerd's default set


def test_terminal_when_asked(images: Images, env: dict[str, str], clean: None) -> None:
    cmd = " ".join(f"'{a}'" for a in rafs_cmd("run", "--rm", images.rafs, "tty"))
    res = run(["script", "-qec", cmd, "/dev/null"], env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "/dev/pts/0" in res.stdout


def test_writes_land_in_the_upper_dir_not_in_the_image(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    res = rafs(env, "run", "--name", "writer", images.rafs, "sh", "-c",
               "echo data > /root/new && rm /etc/debian_version")
    assert res.returncode == 0, res.stderr
    (cdir,) = [p for p in (root / "containers").iterdir() if p.is_dir()]
    upper = cdir / "upper"
    assert (upper / "root/new").read_text() == "data\n"
    gone = os.lstat(upper / "etc/debian_version")  # an overlayfs whiteout
    assert os.major(gone.st_rdev) == 0 and os.minor(gone.st_rdev) == 0
    assert "writer" in rafs(env, "ps").stdout
    assert status_of(env, "writer") == "exited"
    res = rafs(env, "run", "--rm", images.rafs, "sh", "-c",
               "cat /etc/debian_version; test -e /root/new && echo leaked || echo clean")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "clean" and res.stdout[0].isdigit()
    assert rafs(env, "rm", "writer").returncode == 0
    assert not cdir.exists()


def test_two_containers_share_one_daemon_and_one_cache(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    mnt = mount_dir_for(images.rafs_digest)
    a = start(env, "--name", "a", "--stop-timeout", "1", images.rafs, "sleep", "300")
    b = start(env, "--name", "b", images.rafs, "sh", "-c", "sleep 300")
    try:
        wait_until(lambda: status_of(env, "a") == status_of(env, "b") == "running",
                   what="both containers running")
        image_mounts = [line.split()[4] for line in
                        Path("/proc/self/mountinfo").read_text().splitlines()
                        if line.split()[4].startswith(str(RUN_DIR / "images"))]
        assert image_mounts == [str(mnt)]
        assert len(os.listdir(mnt.parent / "users")) == 2
        daemon = read_stats(mnt, env)
        assert daemon["cache_dir"] == str(root / "cache")
        listed = [m for m in json.loads(rafs(env, "ls", "--json").stdout)
                  if m["mountpoint"] == str(mnt)]  # `rafs ls` sees what `rafs run` mounted
        assert [(m["state"], m["pid"], m["image"]) for m in listed] == \
            [("serving", daemon["pid"], daemon["image"])], listed
        a.send_signal(signal.SIGTERM)
        a.wait(timeout=60)
        assert a.returncode in (137, 143), a.stderr.read() if a.stderr else ""
        # b still runs on the same daemon
        assert read_stats(mnt, env)["pid"] == daemon["pid"]
        assert os.listdir(mnt.parent / "users") != []
        res = rafs(env, "rm", "-f", "b")
        assert res.returncode == 0, res.stderr
        b.wait(timeout=60)
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert rafs(env, "rm", "a").returncode == 0
    assert not mnt.exists()


def test_sigterm_stops_the_container_and_cleans_up(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    p = start(env, "--rm", "--name", "term", "--stop-timeout", "1", images.rafs,
              "sleep", "300")
    try:
        wait_until(lambda: status_of(env, "term") == "running", what="the container")
        assert leftovers(root) != []
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 137  # sleep as PID 1 ignores SIGTERM: killed after 1 s
    assert leftovers(root) == []
    assert "term" not in rafs(env, "ps").stdout


# -- the eager baseline ------------------------------------------------------------


def test_plain_image_is_unpacked_whole_and_runs(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    res = rafs(env, "run", "--rm", images.plain, *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()[0].isdigit()
    assert "is not a RAFS image" in res.stderr and "not lazy" in res.stderr
    (unpacked,) = (root / "rootfs").iterdir()
    assert (unpacked / "rootfs/usr/bin/python3").exists()


def test_unpack_matches_umoci_on_every_layer_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.image import resolve_image
    from runtime.unpack import ensure_rootfs

    monkeypatch.setenv("RAFS_ROOT", str(tmp_path / "root"))
    build_oci_image(tmp_path / "layout", "edge", LAYERS)
    ours = ensure_rootfs(resolve_image(f"oci:{tmp_path}/layout:edge"))
    reference = umoci_unpack(tmp_path / "layout", "edge", tmp_path / "umoci")
    diffs = [d for d in compare_trees(ours, reference) if not d.startswith(".: mtime")]
    assert diffs == []


def test_unpack_never_writes_through_a_symlink_out_of_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.image import resolve_image
    from runtime.unpack import ensure_rootfs
    from tests.helpers.ocibuild import symlink_entry

    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("RAFS_ROOT", str(tmp_path / "root"))
    build_oci_image(tmp_path / "layout", "evil", [
        [symlink_entry("escape", str(outside)), symlink_entry("up", "../../../..")],
        [file_entry("escape/owned", b"x"), file_entry("up/tmp-owned", b"x")],
    ])
    rootfs = ensure_rootfs(resolve_image(f"oci:{tmp_path}/layout:evil"))
    assert list(outside.iterdir()) == []
    assert (rootfs / str(outside).lstrip("/") / "owned").read_bytes() == b"x"
    assert (rootfs / "tmp-owned").read_bytes() == b"x"


# -- failures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_cmd_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("nocmd") / "layout"
    build_oci_image(layout, "plain", [[file_entry("hello", b"hi\n")]],
                    config=ImageConfig(cmd=None))
    convert(f"oci:{layout}:plain", f"oci:{layout}:rafs")
    return f"oci:{layout}:rafs"


def test_missing_runc_is_one_clean_error(images: Images, env: dict[str, str], root: Path,
                                         clean: None) -> None:
    res = rafs({**env, "RAFS_RUNC": "/nonexistent/runc"}, "run", "--rm", images.rafs, "true")
    assert "runc" in assert_clean_error(res)
    assert res.returncode == 125
    assert leftovers(root) == []


def test_missing_dev_fuse_is_one_clean_error(images: Images, env: dict[str, str],
                                             root: Path, tmp_path: Path, clean: None) -> None:
    blank = tmp_path / "not-a-device"
    blank.touch()
    # A private mount namespace where /dev/fuse is a plain empty file.
    res = run(["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /dev/fuse && exec "$@"', str(blank),
               *rafs_cmd("run", "--rm", images.rafs, "true")], env=env, timeout=120)
    assert "/dev/fuse" in assert_clean_error(res)
    assert leftovers(root) == []
    assert rafs(env, "ps", "-q").stdout == ""


def test_image_without_command_is_one_clean_error(no_cmd_image: str, env: dict[str, str],
                                                  root: Path, clean: None) -> None:
    res = rafs(env, "run", "--name", "nocmd", no_cmd_image)
    assert "no command" in assert_clean_error(res)
    assert leftovers(root) == []
    assert rafs(env, "ps", "-q").stdout == ""


def test_unknown_user_is_one_clean_error_and_unmounts(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    res = rafs(env, "run", "--name", "who", "-u", "nosuchuser", images.rafs, "true")
    assert "nosuchuser" in assert_clean_error(res)
    res = rafs(env, "run", "--rm", "-u", "nobody:nosuchgroup", images.rafs, "true")
    assert "nosuchgroup" in assert_clean_error(res)
    assert leftovers(root) == []  # the image was mounted to read /etc/passwd, and is not now
    assert rafs(env, "ps", "-q").stdout == ""


def test_rm_refuses_a_running_container_without_force(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    p = start(env, "--name", "busy", images.rafs, "sleep", "300")
    try:
        wait_until(lambda: status_of(env, "busy") == "running", what="the container")
        assert "rafs rm -f" in assert_clean_error(rafs(env, "rm", "busy"))
        assert rafs(env, "rm", "-f", "busy").returncode == 0
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "busy" not in rafs(env, "ps").stdout
    assert "no such container" in assert_clean_error(rafs(env, "rm", "busy"))


def test_unknown_mode_is_one_clean_error(images: Images, env: dict[str, str], root: Path,
                                         clean: None) -> None:
    res = rafs(env, "run", "--rm", "--mode", "bogus", images.rafs, "true")
    assert "--mode bogus" in assert_clean_error(res)
    assert res.returncode == 125
    assert leftovers(root) == []


def test_rm_force_cleans_up_after_a_killed_rafs_run(
        images: Images, env: dict[str, str], root: Path, clean: None) -> None:
    p = start(env, "--name", "orphan", images.rafs, "sleep", "300")
    try:
        wait_until(lambda: status_of(env, "orphan") == "running", what="the container")
        p.kill()  # SIGKILL: rafs run cannot clean up; runc and the container live on
        p.wait()
        assert status_of(env, "orphan") == "running"
        res = rafs(env, "rm", "-f", "orphan")
        assert res.returncode == 0, res.stderr
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert leftovers(root) == []
    assert rafs(env, "ps", "-q").stdout == ""


# -- optimize ---------------------------------------------------------------------


def test_optimized_image_serves_the_traced_workload_from_prefetch(
        images: Images, env: dict[str, str], root: Path, tmp_path: Path,
        clean: None) -> None:
    dst = tmp_path / "optimized"
    res = rafs(env, "optimize", images.rafs, f"oci:{dst}:opt", "--", *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    assert "files traced" in res.stderr
    manifest = OCILayout(dst).resolve("opt")
    res = rafs(env, "run", "--rm", "--mode", "fuse", "--keep-mounted", "--cache-dir",
               tmp_path / "cold", f"oci:{dst}:opt", *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    mnt = mount_dir_for(manifest.digest)
    try:
        wait_until(lambda: read_stats(mnt, env)["stats"]["prefetch"]["state"] == "done",
                   what="prefetch to finish")
        stats = read_stats(mnt, env)["stats"]
    finally:
        rafs(env, "umount", mnt)
    assert stats["chunks"]["prefetch"] > 0
    # what the workload read came from prefetch: on-demand fetches are rare at most
    assert stats["chunks"]["ondemand"] <= stats["chunks"]["prefetch"] // 10, stats
    assert stats["cache_hits"] > stats["cache_misses"], stats


# -- from the registry ----------------------------------------------------------------


class RegistryImages:
    def __init__(self, plain: str, rafs: str) -> None:
        self.plain = plain
        self.rafs = rafs


@pytest.fixture(scope="module")
def registry_images(registry: object, debian_numpy_image: tuple[Path, str]) -> RegistryImages:
    """The numpy image in one repository of the real registry: ``:plain`` (pushed by
    skopeo) and ``:rafs`` (its conversion, pushed by `rafs convert`)."""
    src, tag = debian_numpy_image
    plain = registry.ref("runtime/numpy", "plain")  # type: ignore[attr-defined]
    res = run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{src}:{tag}",
               plain], timeout=300)
    assert res.returncode == 0, res.stderr
    lazy = registry.ref("runtime/numpy", "rafs")  # type: ignore[attr-defined]
    convert(plain, lazy)
    return RegistryImages(plain, lazy)


def test_numpy_from_the_registry_runs_lazily(registry_images: RegistryImages,
                                             env: dict[str, str], root: Path,
                                             clean: None) -> None:
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    ref = parse_image_ref(registry_images.rafs)
    with RegistryClient.for_ref(ref) as client:
        manifest = client.resolve(ref)
    res = rafs(env, "run", "--rm", "--mode", "fuse", "--keep-mounted", "--cache-dir",
               root / "cache-registry", registry_images.rafs, *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()[0].isdigit()
    mnt = mount_dir_for(manifest.digest)
    try:
        reply = read_stats(mnt, env)
    finally:
        rafs(env, "umount", mnt)
    assert reply["image"] == f"docker://{ref.path}@{manifest.digest}"  # pinned
    blobs = sum(d.size for d in manifest.layers[:-1])
    assert 0 < reply["stats"]["backend_bytes"] < blobs / 2  # type: ignore[index]


def test_plain_image_from_the_registry_is_pulled_whole(registry_images: RegistryImages,
                                                       env: dict[str, str],
                                                       clean: None) -> None:
    res = rafs(env, "run", "--rm", registry_images.plain, *NUMPY_CMD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()[0].isdigit()
    assert "not lazy" in res.stderr


def test_optimize_finds_the_original_of_a_registry_image(
        registry_images: RegistryImages, env: dict[str, str], tmp_path: Path,
        clean: None) -> None:
    dst = tmp_path / "opt"
    res = rafs(env, "optimize", registry_images.rafs, f"oci:{dst}:opt", "--", "python3", "-c",
               "import json")
    assert res.returncode == 0, res.stderr
    assert f"converting {registry_images.plain.rsplit(':', 1)[0]}@sha256:" in res.stderr
    assert OCILayout(dst).resolve("opt").layers
