"""Session-wide test setup: environment checks and the shared image fixtures.

Owns: the test markers' rules (``registry`` set on every test using a registry
fixture; the loud failure, before anything runs, when a selected test needs
what the machine lacks: ``fuse`` without ``/dev/fuse``, ``root`` as a user),
making ``tests.helpers`` importable however pytest is started, a private run
directory for the daemons the tests start (``RAFS_RUN_DIR``; removed when the
session passes, kept with its daemon logs and named in the summary when a
test failed), the
session-scoped Debian image fixtures from ``bench.corpus``, and the real
registries (Debian's ``docker-registry``, see ``bench.registry``): ``registry``
(anonymous), ``registry_basic`` (htpasswd) and ``registry_token`` (bearer
tokens from ``tests.helpers.token_issuer``).

``make test`` runs every test, as root (CI does); nothing here skips for lack of
privileges. ``pytest -m "not fuse and not root"`` is the selection a machine without
/dev/fuse or root runs (the markers are listed in pyproject.toml; ``kernel`` implies
``root``).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # so `from tests.helpers import ...` always works

from bench import corpus  # noqa: E402
from bench.registry import RegistryServer  # noqa: E402
from tests.helpers.registries import AuthRegistry, basic_registry, token_registry  # noqa: E402

#: Fixtures that start a real docker-registry: a test using one is marked ``registry``.
REGISTRY_FIXTURES = frozenset({"registry", "registry_basic", "registry_token",
                               "rafs_python_ref", "rafs_numpy_ref"})


def pytest_sessionstart(session: pytest.Session) -> None:
    # Daemons started by tests keep their sockets, state and logs in a directory
    # of this session, not in the host's /run/rafs.
    run_dir = tempfile.mkdtemp(prefix="rafs-test-run-")
    os.environ["RAFS_RUN_DIR"] = run_dir
    session.config.stash[_RUN_DIR] = run_dir


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REGISTRY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.registry)
        if item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.root)  # only root mounts EROFS


def _missing_fuse() -> str | None:
    try:
        st = os.stat("/dev/fuse")
    except FileNotFoundError:
        return ("/dev/fuse is missing: run `make setup` as root (or load the fuse module), "
                'or select the tests that need no FUSE: -m "not fuse and not root"')
    if not stat.S_ISCHR(st.st_mode):
        return "/dev/fuse is not a character device"
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail loudly, before anything runs, when a selected test needs what this machine
    lacks (nothing is skipped): FUSE tests without /dev/fuse, root tests as a user."""
    fuse = [i for i in session.items if i.get_closest_marker("fuse")]
    root = [i for i in session.items if i.get_closest_marker("root")]
    problems = []
    if fuse and (why := _missing_fuse()):
        problems.append(f"{len(fuse)} selected tests mount through FUSE; {why}")
    if root and os.geteuid() != 0:
        problems.append(f"{len(root)} selected tests need root: run them as root, or "
                        'select -m "not fuse and not root"')
    if problems:
        pytest.exit("; ".join(problems), returncode=pytest.ExitCode.USAGE_ERROR)


_RUN_DIR = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's run directory, unless a test failed and a daemon left files
    there: then its logs may say why, and the terminal summary names it."""
    run_dir = session.config.stash.get(_RUN_DIR, None)
    if run_dir is None:
        return
    if exitstatus != 0 and any(files for _d, _s, files in os.walk(run_dir)):
        return
    mounted = Path("/proc/self/mountinfo").read_text()
    if f" {run_dir}/" in mounted:
        return  # a test left a mount behind (its own test fails on that): keep the evidence
    shutil.rmtree(run_dir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    run_dir = terminalreporter.config.stash.get(_RUN_DIR, None)
    if run_dir is not None and os.path.isdir(run_dir):
        terminalreporter.write_line(f"daemon logs of this session kept in {run_dir}")


@pytest.fixture(scope="session")
def corpus_cache() -> Path:
    """Where the reference images live: ``$RAFS_CACHE`` or ``/var/cache/rafs``."""
    return corpus.default_cache_dir()


@pytest.fixture(scope="session")
def debian_image(corpus_cache: Path) -> tuple[Path, str]:
    """(OCI layout dir, tag) of Debian bookworm minbase + python3: two gzip layers."""
    return corpus.debian_python_image(corpus_cache)


@pytest.fixture(scope="session")
def debian_numpy_image(corpus_cache: Path) -> tuple[Path, str]:
    """(OCI layout dir, tag) of the python3 image plus a python3-numpy layer."""
    return corpus.debian_numpy_image(corpus_cache)


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """An anonymous ``docker-registry`` on 127.0.0.1:RANDOM with temporary storage.

    Shared by the session: use a repository name of your own and
    ``registry.mark()`` / ``registry.access_log(since_mark=True)`` to count
    your own requests.
    """
    with RegistryServer() as server:
        yield server


@pytest.fixture(scope="session")
def registry_basic() -> Iterator[AuthRegistry]:
    """A ``docker-registry`` with htpasswd basic auth; ``.user``/``.password``/``.creds``."""
    with basic_registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_token() -> Iterator[AuthRegistry]:
    """A ``docker-registry`` with token auth; ``.issuer`` is the ``TokenIssuer``
    (its ``expires_in`` may be changed with ``monkeypatch``; ``.issuer.requests``
    records each token request). ``.user`` may pull and push;
    ``tests.helpers.registries.READER_USER`` may only pull."""
    with token_registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def rafs_python_ref(registry: RegistryServer, debian_image: tuple[Path, str]) -> str:
    """The python3 image converted to RAFS and pushed: ``docker://HOST/rafs/debian:python``."""
    from converter.convert import ConvertOptions, convert

    src, tag = debian_image
    ref = registry.ref("rafs/debian", "python")
    convert(f"oci:{src}:{tag}", ref, ConvertOptions(progress=False))
    return ref


@pytest.fixture(scope="session")
def rafs_numpy_ref(registry: RegistryServer, rafs_python_ref: str,
                   debian_numpy_image: tuple[Path, str]) -> str:
    """The python3-numpy image converted to RAFS and pushed after the python3 one,
    into the same repository: ``docker://HOST/rafs/debian:numpy``."""
    from converter.convert import ConvertOptions, convert

    src, tag = debian_numpy_image
    ref = registry.ref("rafs/debian", "numpy")
    convert(f"oci:{src}:{tag}", ref, ConvertOptions(progress=False))
    return ref
