"""The command line keeps its promises, for every subcommand, with bad input.

One table, ``CASES``: each row runs one real ``rafs`` command as a subprocess
(as root, or as the real unprivileged user ``nobody`` through ``setpriv``)
with bad input — nonexistent references, transports the command does not
take, missing files, a truncated archive, a registry that is down or refuses
the push, a stdout nobody reads, no root — and the test asserts the
contract of the README's "Exit status" table:

- the documented exit status;
- on an error, exactly one line on stderr, ``rafs: error: ...``, naming what
  the row says, and never an ``internal error`` (a bug) or a traceback;
  on a clean exit (a closed stdout: 141), nothing on stderr;
- nothing left behind: no new mount, no daemon, no new file in the run
  directory or the runtime root, no target written.

Adding a command, or a case, is adding a row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.mounts import REPO_ROOT, mounted, rafs_cmd, rafs_mounts
from tests.helpers.ocibuild import build_docker_archive, build_oci_image, file_entry
from tests.helpers.registries import READER_PASSWORD, READER_USER

pytestmark = [pytest.mark.fuse, pytest.mark.root]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_RUNTIME, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_CLOSED_STDOUT = 125, 126, 127, 141


@dataclass
class Workspace:
    """What the rows point at: images, files, registries, a mount, private state dirs."""

    dir: Path
    run: Path  # RAFS_RUN_DIR of every row
    root: Path  # RAFS_ROOT of every row
    plain: str  # a plain OCI image (oci:DIR:TAG)
    rafs: str  # the same converted to RAFS
    archive: Path  # a docker save archive of it
    truncated: Path  # the archive cut short inside its layer
    prefetch_relative: Path  # a prefetch list whose 2nd entry is relative
    prefetch_dotdot: Path  # one with '..'
    down: str  # host:port where no registry answers
    registry: str  # host:port of a registry that takes pushes
    token_registry: str  # host:port of a token-auth registry
    mnt: Path  # a rafs mount of ``rafs``
    shared: Path  # a directory nobody can enter (pytest's tmp is root's only): a copy of
    # ``rafs`` (shared/rafs:v1), an empty mount point and a cache directory nobody may use
    user_mnt: Path
    user_cache: Path

    def missing(self, name: str = "nothing") -> Path:
        return self.dir / "missing" / name


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Workspace], list[str]]
    status: int
    says: str = ""  # the error line contains this (empty: a clean exit)
    user: str = "root"  # or "nobody"
    stdout: str = "pipe"  # or "closed": the reader of stdout has gone
    writes: Callable[[Workspace], Path] | None = None  # must not exist afterwards
    env: tuple[tuple[str, str], ...] = ()  # more environment ({shared}: ws.shared)
    no_fuse_device: bool = False  # /dev/fuse is root's only (0600), whatever the host has


CASES = [
    # -- usage: argparse's complaints are one line too; 2, or 125 for run/optimize --
    Case("no command", lambda w: [], EXIT_USAGE, "arguments are required"),
    Case("unknown command", lambda w: ["frobnicate"], EXIT_USAGE, "invalid choice"),
    Case("unknown option", lambda w: ["inspect", "--frob", w.rafs], EXIT_USAGE,
         "unrecognized arguments"),
    Case("run: unknown --net", lambda w: ["run", "--net", "bridge", w.rafs, "true"],
         EXIT_RUNTIME, "invalid choice: 'bridge'"),
    Case("run: bad --mode", lambda w: ["run", "--rm", "--mode", "fusee", w.rafs, "true"],
         EXIT_RUNTIME, "--mode fusee"),
    Case("run: no image", lambda w: ["run"], EXIT_RUNTIME, "IMAGE"),
    Case("optimize: bad --net", lambda w: ["optimize", "--net", "x", w.plain, w.plain],
         EXIT_RUNTIME, "invalid choice"),
    Case("mount: no transport", lambda w: ["mount", "foo", str(w.mnt)], EXIT_ERROR,
         "`rafs mount` takes oci:DIR[:TAG] or docker://"),
    Case("mount: docker-archive", lambda w: ["mount", f"docker-archive:{w.archive}",
                                             str(w.dir / "m1")],
         EXIT_ERROR, "as IMAGE, not a `docker save` archive"),
    Case("umount: bad --timeout", lambda w: ["umount", "--timeout", "soon", str(w.mnt)],
         EXIT_USAGE, "--timeout"),
    Case("mount: bad --mode", lambda w: ["mount", "--mode", "fusee", w.rafs, str(w.mnt),
                                         "--cache-dir", str(w.dir / "c")],
         EXIT_USAGE, "invalid choice: 'fusee'"),
    Case("convert: bad --chunk-size", lambda w: ["convert", "--chunk-size", "lots", w.plain,
                                                 f"oci:{w.dir}/o1:v1"],
         EXIT_USAGE, "--chunk-size", writes=lambda w: w.dir / "o1"),
    # -- references: what each command takes, from rafs.transports --
    Case("inspect: no transport", lambda w: ["inspect", "foo"], EXIT_ERROR,
         "`rafs inspect` takes oci:DIR[:TAG] or docker://"),
    Case("inspect: docker-archive", lambda w: ["inspect", f"docker-archive:{w.archive}"],
         EXIT_ERROR, "not a `docker save` archive"),
    Case("check: missing layout", lambda w: ["check", f"oci:{w.missing()}:v1"], EXIT_ERROR,
         "not an OCI image layout"),
    Case("inspect: registry down", lambda w: ["inspect", f"docker://{w.down}/x:y"],
         EXIT_ERROR, "Connection refused"),
    Case("convert: missing source", lambda w: ["convert", f"oci:{w.missing()}:v1",
                                               f"oci:{w.dir}/o2:v1"],
         EXIT_ERROR, "not an OCI image layout", writes=lambda w: w.dir / "o2"),
    Case("convert: missing archive", lambda w: ["convert", f"docker-archive:{w.missing()}",
                                                f"oci:{w.dir}/o3:v1"],
         EXIT_ERROR, "no such file", writes=lambda w: w.dir / "o3"),
    Case("convert: truncated archive", lambda w: ["convert", f"docker-archive:{w.truncated}",
                                                  f"oci:{w.dir}/o4:v1", "--no-progress"],
         EXIT_ERROR, "is truncated", writes=lambda w: w.dir / "o4"),
    Case("convert: archive target", lambda w: ["convert", w.plain, f"docker-archive:{w.dir}/x"],
         EXIT_ERROR, "`rafs convert` takes oci:DIR[:TAG] or docker://",
         writes=lambda w: w.dir / "x"),
    Case("convert: already RAFS", lambda w: ["convert", w.rafs, f"oci:{w.dir}/o5:v1"],
         EXIT_ERROR, "already a RAFS image", writes=lambda w: w.dir / "o5"),
    Case("convert: bad --chunk-dict", lambda w: ["convert", "--chunk-dict",
                                                 f"docker-archive:{w.archive}", w.plain,
                                                 f"oci:{w.dir}/o6:v1"],
         EXIT_ERROR, "as --chunk-dict", writes=lambda w: w.dir / "o6"),
    Case("convert: missing prefetch list", lambda w: ["convert", "--prefetch-list",
                                                      str(w.missing("list")), w.plain,
                                                      f"oci:{w.dir}/o7:v1"],
         EXIT_ERROR, "No such file", writes=lambda w: w.dir / "o7"),
    Case("convert: relative prefetch entry", lambda w: [
        "convert", "--prefetch-list", str(w.prefetch_relative), w.plain, f"oci:{w.dir}/o8:v1"],
        EXIT_ERROR, ":2: 'etc/relative' is not an absolute path", writes=lambda w: w.dir / "o8"),
    Case("convert: '..' prefetch entry", lambda w: [
        "convert", "--prefetch-list", str(w.prefetch_dotdot), w.plain, f"oci:{w.dir}/o9:v1"],
        EXIT_ERROR, ":1: '/../etc/passwd'", writes=lambda w: w.dir / "o9"),
    # -- a registry target is checked before converting --
    Case("convert: target registry down", lambda w: ["convert", w.plain, f"docker://{w.down}/x:y"],
         EXIT_ERROR, "push to {down}/x"),
    Case("convert: no push access", lambda w: [
        "convert", "--creds", f"{READER_USER}:{READER_PASSWORD}", w.plain,
        f"docker://{w.token_registry}/contract/ro:v1"], EXIT_ERROR, "push to"),
    # -- run: docker's statuses --
    Case("run: command not found", lambda w: ["run", "--rm", w.rafs, "no-such-command"],
         EXIT_NOT_FOUND, "no-such-command: executable file not found in $PATH"),
    Case("run: command is a directory", lambda w: ["run", "--rm", w.rafs, "/etc"],
         EXIT_CANNOT_EXECUTE, "/etc: is a directory"),
    Case("run: command not executable", lambda w: ["run", "--rm", w.rafs, "/etc/hostname"],
         EXIT_CANNOT_EXECUTE, "permission denied"),
    Case("run: missing image", lambda w: ["run", "--rm", f"oci:{w.missing()}:v1", "true"],
         EXIT_RUNTIME, "not an OCI image layout"),
    Case("run: registry down", lambda w: ["run", "--rm", f"docker://{w.down}/x:y", "true"],
         EXIT_RUNTIME, "Connection refused"),
    Case("run: docker-archive", lambda w: ["run", f"docker-archive:{w.archive}", "true"],
         EXIT_RUNTIME, "`rafs run` takes"),
    Case("optimize: docker-archive", lambda w: ["optimize", f"docker-archive:{w.archive}",
                                                f"oci:{w.dir}/p1:v1", "--", "true"],
         EXIT_RUNTIME, "`rafs optimize` takes", writes=lambda w: w.dir / "p1"),
    Case("optimize: target registry down", lambda w: [
        "optimize", w.plain, f"docker://{w.down}/x:y", "--", "true"], EXIT_RUNTIME, "push to"),
    Case("rm: no such container", lambda w: ["rm", "nobody-has-this-name"], EXIT_ERROR,
         "no such container"),
    # -- non-root: say what is needed, touch nothing --
    Case("run as nobody", lambda w: ["run", "--rm", w.rafs, "true"], EXIT_RUNTIME,
         "rafs run needs root", user="nobody"),
    Case("optimize as nobody", lambda w: ["optimize", w.plain, f"oci:{w.dir}/p2:v1", "--",
                                          "true"],
         EXIT_RUNTIME, "rafs optimize needs root", user="nobody", writes=lambda w: w.dir / "p2"),
    Case("ps as nobody", lambda w: ["ps", "-q"], EXIT_OK, user="nobody"),
    Case("ls as nobody", lambda w: ["ls"], EXIT_OK, user="nobody"),
    Case("image prune as nobody", lambda w: ["image", "prune"], EXIT_OK, user="nobody"),
    Case("mount as nobody", lambda w: ["mount", f"oci:{w.shared}/rafs:v1", str(w.user_mnt),
                                       "--cache-dir", str(w.user_cache)],
         EXIT_ERROR, "/dev/fuse: Permission denied", user="nobody", no_fuse_device=True,
         env=(("XDG_RUNTIME_DIR", "{shared}/xdg"),)),  # its run dir: <xdg>/rafs, ours
    Case("stats as nobody on root's mount", lambda w: ["stats", str(w.mnt)], EXIT_ERROR,
         "{mnt} belongs to root's rafs; run as root", user="nobody"),
    Case("trace as nobody on root's mount", lambda w: ["trace", str(w.mnt)], EXIT_ERROR,
         "belongs to root's rafs; run as root", user="nobody"),
    Case("umount as nobody on root's mount", lambda w: ["umount", str(w.mnt)], EXIT_ERROR,
         "belongs to root's rafs; run as root", user="nobody"),
    Case("umount --force as nobody on root's mount", lambda w: ["umount", "-f", str(w.mnt)],
         EXIT_ERROR, "belongs to root's rafs; run as root", user="nobody"),
    Case("bench as nobody", lambda w: ["bench", "--quick"], EXIT_ERROR,
         "rafs bench needs root", user="nobody"),
    Case("bench: corpus cannot be built", lambda w: ["bench", "--quick", "--out",
                                                     f"{w.dir}/bench"],
         EXIT_ERROR, "/dev/null/corpus", env=(("RAFS_CACHE", "/dev/null/corpus"),)),
    # -- a stdout nobody reads: quiet, 141, as cat --
    Case("inspect | closed", lambda w: ["inspect", "--json", w.rafs], EXIT_CLOSED_STDOUT,
         stdout="closed"),
    Case("check | closed", lambda w: ["check", "--json", w.rafs], EXIT_CLOSED_STDOUT,
         stdout="closed"),
    Case("ps | closed", lambda w: ["ps", "--json"], EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("image ls | closed", lambda w: ["image", "ls"], EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("ls | closed", lambda w: ["ls", "--json"], EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("stats | closed", lambda w: ["stats", str(w.mnt)], EXIT_CLOSED_STDOUT,
         stdout="closed"),
    Case("stats --prometheus | closed", lambda w: ["stats", "--prometheus", str(w.mnt)],
         EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("trace | closed", lambda w: ["trace", str(w.mnt)], EXIT_CLOSED_STDOUT,
         stdout="closed"),
    Case("convert | closed", lambda w: ["convert", "--json", w.plain, f"oci:{w.dir}/q1:v1"],
         EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("--help | closed", lambda w: ["convert", "--help"], EXIT_OK, stdout="closed"),
    # -- the chunk cache --
    Case("cache: no cache there", lambda w: ["cache", "status", "--cache-dir",
                                             str(w.missing("cache"))],
         EXIT_ERROR, "no cache at"),
    Case("cache prune: bad --to", lambda w: ["cache", "prune", "--to", "lots", "--cache-dir",
                                             str(w.dir / "cache")],
         EXIT_USAGE, "argument --to: bad size 'lots'"),
    Case("cache verify | closed", lambda w: ["cache", "verify", "--json", "--cache-dir",
                                             str(w.dir / "cache")],
         EXIT_CLOSED_STDOUT, stdout="closed"),
    Case("cache: unknown subcommand", lambda w: ["cache", "bogus"], EXIT_USAGE,
         "invalid choice: 'bogus'"),
    Case("cache status | closed", lambda w: ["cache", "status", "--json", "--cache-dir",
                                             str(w.dir / "cache")],
         EXIT_CLOSED_STDOUT, stdout="closed"),
    # -- fused commands on what is not a mount --
    Case("stats: not a mount", lambda w: ["stats", str(w.dir)], EXIT_ERROR,
         "is not a rafs mount"),
    Case("trace: not a mount", lambda w: ["trace", str(w.dir)], EXIT_ERROR,
         "is not a rafs mount"),
    Case("umount: not a mount", lambda w: ["umount", str(w.dir)], EXIT_ERROR,
         "is not a rafs mount"),
    Case("upgrade: not a mount", lambda w: ["upgrade", str(w.dir)], EXIT_ERROR,
         "is not a rafs mount"),
    Case("upgrade: no mount point", lambda w: ["upgrade"], EXIT_ERROR, "or --all"),
    Case("daemon: socket cannot be bound", lambda w: ["daemon", "--socket",
                                                      f"{w.missing()}/node.sock"],
         EXIT_ERROR, "cannot bind"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rafs_env(ws: Workspace) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "RAFS_RUN_DIR": str(ws.run),
            "RAFS_ROOT": str(ws.root)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, registry, registry_token) -> Iterator[Workspace]:
    base = tmp_path_factory.mktemp("contract")
    os.chmod(base, 0o755)  # nobody's rows name paths in here
    layers = [[file_entry("etc/hostname", b"contract\n"),
               file_entry("bin/hello", b"#!/bin/hello\n", mode=0o755),
               file_entry("big", os.urandom(300_000))]]
    build_oci_image(base / "plain", "v1", layers)
    archive = base / "image.tar"
    build_docker_archive(archive, layers)
    truncated = base / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:100_000])
    (base / "relative.list").write_text("/etc/hostname\netc/relative\n")
    (base / "dotdot.list").write_text("/../etc/passwd\n")
    shared = Path(tempfile.mkdtemp(prefix="rafs-contract-"))
    os.chmod(shared, 0o755)
    w = Workspace(
        dir=base, run=base / "run", root=base / "root", plain=f"oci:{base}/plain:v1",
        rafs=f"oci:{base}/rafs:v1", archive=archive, truncated=truncated,
        prefetch_relative=base / "relative.list", prefetch_dotdot=base / "dotdot.list",
        down=f"127.0.0.1:{_free_port()}", registry=registry.host,
        token_registry=registry_token.host, mnt=base / "mnt", shared=shared,
        user_mnt=shared / "mnt", user_cache=shared / "cache")
    try:
        for d in (w.user_mnt, w.user_cache, shared / "xdg"):
            d.mkdir()
            os.chmod(d, 0o777)
        subprocess.run(rafs_cmd("convert", w.plain, w.rafs, "--no-progress"),
                       env=_rafs_env(w), check=True, capture_output=True)
        shutil.copytree(base / "rafs", shared / "rafs")
        with mounted(w.rafs, w.mnt, base / "cache", env={"RAFS_RUN_DIR": str(w.run)}):
            (w.mnt / "etc" / "hostname").read_bytes()  # something for `rafs trace`
            yield w
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@dataclass
class Snapshot:
    files: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)
    daemons: set[int] = field(default_factory=set)


def _kept_by_design(name: str) -> bool:
    """Files rafs keeps on purpose: locks (of the containers directory, of an image's
    shared mount) and the daemons' logs in the run directory (``<key>.log``, fused's:
    when it goes with its mount is the daemon lifecycle's business, not this table's)."""
    return name.endswith((".lock", ".log"))


def _files(*dirs: Path) -> set[str]:
    """Files below ``dirs`` (directories do not count: rafs keeps its own)."""
    out = set()
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            if os.path.ismount(dirpath):
                dirnames[:] = []
                continue
            out.update(os.path.join(dirpath, n) for n in filenames if not _kept_by_design(n))
    return out


def _daemons(ws: Workspace) -> set[int]:
    """Processes whose command line names a path of the workspace (daemons, runc, ...)."""
    out = set()
    needle = str(ws.dir).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                out.add(int(entry))
    return out


def _snapshot(ws: Workspace) -> Snapshot:
    mounts = {m for m in rafs_mounts() if m.startswith(str(ws.dir))}
    mounts |= {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4].startswith(str(ws.dir))}
    # <root>/cache is the chunk cache: keeping what was fetched is its job
    return Snapshot(_files(ws.run, ws.root / "containers", ws.root / "rootfs"), mounts,
                    _daemons(ws))


def _says(case: Case, ws: Workspace) -> str:
    return case.says.replace("{down}", ws.down).replace("{mnt}", str(ws.mnt))


def _reachable_by_others(path: str) -> bool:
    """Whether a user who is neither owner nor group may execute ``path`` (every
    directory on the way searchable, the file executable, for "other")."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in [real, *real.parents])


def _python_for_nobody() -> tuple[str, list[str]]:
    """An interpreter nobody can execute, and what its PYTHONPATH needs. The daemon of
    `rafs mount` is started with ``sys.executable``: when this test's venv sits on an
    interpreter below a directory nobody may enter (pyenv in root's home), the system's
    python of the same version runs it with the venv's packages."""
    if _reachable_by_others(sys.executable):
        return sys.executable, []
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    assert os.path.exists(system) and _reachable_by_others(system), (
        f"no python {sys.version_info[:2]} that user nobody may execute")
    site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    return system, site


#: What `no_fuse_device` runs the row in: a private mount namespace whose /dev/fuse is a
#: root-only node (as on a host that does not give users FUSE), gone with the process.
_NO_FUSE_DEVICE = ('d=$(mktemp -d) && mknod -m 0600 "$d/fuse" c 10 229 && '
                   'mount --bind "$d/fuse" /dev/fuse && rm -r "$d" && exec "$@"')


def _argv(case: Case, ws: Workspace) -> list[str]:
    args = [a.replace("{down}", ws.down) for a in case.argv(ws)]
    argv = rafs_cmd(*args)
    if case.user == "nobody":
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                _python_for_nobody()[0], *argv[1:]]
    if case.no_fuse_device:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NO_FUSE_DEVICE,
                "sh", *argv]
    return argv


def _env(case: Case, ws: Workspace) -> dict[str, str]:
    extra = {k: v.replace("{shared}", str(ws.shared)) for k, v in case.env}
    if case.user == "nobody":  # what a login of nobody has: no RAFS_* of ours
        path = os.pathsep.join([str(REPO_ROOT), *_python_for_nobody()[1]])
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent",
                "PYTHONPATH": path, **extra}
    return _rafs_env(ws) | extra


def _run(case: Case, ws: Workspace) -> subprocess.CompletedProcess[str]:
    argv = _argv(case, ws)
    env = _env(case, ws)
    if case.stdout == "closed":
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True,
                                  env=env, cwd="/", timeout=300, stdin=subprocess.DEVNULL)
        finally:
            os.close(write)
        return subprocess.CompletedProcess(argv, proc.returncode, "", proc.stderr)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_command_keeps_the_contract(case: Case, ws: Workspace) -> None:
    before = _snapshot(ws)
    res = _run(case, ws)
    shown = f"{' '.join(res.args)}\nexit {res.returncode}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, shown
    assert res.returncode == case.status, shown
    if case.says:
        message = res.stderr.strip()
        assert "\n" not in message, f"more than one line on stderr\n{shown}"
        assert message.startswith("rafs: error: "), shown
        assert "internal error" not in message, shown
        assert _says(case, ws) in message, shown
    else:
        assert res.stderr == "", shown
    after = _snapshot(ws)
    assert after.mounts == before.mounts, "a mount was left behind"
    assert after.daemons <= before.daemons, "a process was left behind"
    assert after.files == before.files, f"files were left behind: {after.files - before.files}"
    if case.writes is not None:
        assert not case.writes(ws).exists(), "a failed command wrote its target"


def test_the_table_names_every_command(ws: Workspace) -> None:
    """A new subcommand gets rows here: the table covers every command of `rafs --help`
    (what a row runs first is its command; the top level's own rows run none)."""
    from runtime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    covered = {c.argv(ws)[0] for c in CASES if c.argv(ws)}
    exempt = {"snapshotter"}  # serves until SIGTERM: tests/test_snapshotter_api.py
    missing = set(sub.choices) - covered - exempt
    assert not missing, f"commands without a row in CASES: {sorted(missing)}"


def test_each_command_is_registered_by_the_module_the_table_names() -> None:
    """`rafs CMD` imports only CMD's module (runtime.cli.REGISTRARS): the table must say
    exactly what each module registers, and a parser built for CMD must parse CMD."""
    import importlib

    from runtime.cli import REGISTRARS, build_parser

    for module, commands in REGISTRARS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert tuple(sub.choices) == commands, module
    full = next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction))
    assert tuple(full.choices) == tuple(c for cs in REGISTRARS.values() for c in cs)
    for commands in REGISTRARS.values():
        for command in commands:
            parser = build_parser([command])
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            assert tuple(sub.choices) == commands, command
    args = build_parser(["ps", "-v"]).parse_args(["ps", "-v"])
    assert args.command == "ps" and args.func is not None


def test_a_command_does_not_import_the_others() -> None:
    """`rafs ps` builds its parser without the converter, the snapshotter or the bench."""
    code = ("import sys; from runtime.cli import build_parser; build_parser(['ps']); "
            "print(' '.join(m for m in ('converter.cli', 'snapshotter.cli', 'bench.coldstart',"
            " 'fused.cli') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert res.stdout.strip() == ""


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    import rafs

    res = subprocess.run([sys.executable, "-m", "runtime.cli", "--version"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"rafs {version('rafs')}" == f"rafs {rafs.version()}"


def test_ls_shows_the_daemons_version_and_marks_none_of_this_rafs(ws: Workspace) -> None:
    import rafs

    env = _rafs_env(ws)
    res = subprocess.run(rafs_cmd("ls", "--json"), env=env, capture_output=True, text=True,
                         check=True)
    from fused.supervisor import code_version

    (ours,) = [m for m in json.loads(res.stdout) if m["mountpoint"] == str(ws.mnt)]
    # a plain daemon says the package's version, a supervised worker adds its code's digest
    expected = code_version() if ours["supervised"] else rafs.version()
    assert ours["version"] == expected and ours["state"] == "serving"
    table = subprocess.run(rafs_cmd("ls"), env=env, capture_output=True, text=True,
                           check=True).stdout
    (row,) = [line for line in table.splitlines() if line.startswith(f"{ws.mnt} ")]
    assert f" {expected} " in row and "*" not in row, table
    if ours["supervised"]:  # both processes: the worker, then its supervisor
        assert re.search(rf"\s{ours['pid']}\s+{ours['owner_pid']}\s", row), table


# -- the mechanism itself, in process ---------------------------------------------------


def test_a_bug_is_one_line_and_its_traceback_needs_v(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.console import run_command

    def broken() -> int:
        raise ValueError("a bug")

    assert run_command(broken, "inspect", 0) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("rafs: error: internal error: ValueError: a bug") and err.count("\n") == 1
    assert run_command(broken, "run", 1) == EXIT_RUNTIME
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("rafs: error: internal")


def test_an_os_error_names_its_path(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.console import run_command

    def denied() -> int:
        raise PermissionError(13, "Permission denied", "/var/lib/rafs/containers")

    assert run_command(denied, "ps", 0) == EXIT_ERROR
    assert capsys.readouterr().err == "rafs: error: /var/lib/rafs/containers: Permission denied\n"


def test_a_multi_line_message_is_printed_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from rafs.errors import RafsError
    from runtime.console import run_command

    def failing() -> int:
        raise RafsError("it failed; log tail:\nline one\n\nline two\n")

    assert run_command(failing, "convert", 0) == EXIT_ERROR
    assert capsys.readouterr().err == "rafs: error: it failed; log tail: | line one | line two\n"
