"""A real OCI registry for tests and benchmarks: Debian's ``docker-registry``.

Owns: ``RegistryServer``, which writes a config for distribution 2.8
(``/usr/bin/docker-registry``), starts it on 127.0.0.1 on a free port with
temporary storage, waits until ``/v2/`` answers, and always stops it (context
manager; SIGTERM, then SIGKILL of its process group; the storage it made is
removed). Auth modes: anonymous, ``HtpasswdAuth`` (bcrypt entries) and
``TokenAuth`` (the registry verifies JWTs from a token issuer, see
``tests/helpers/token_issuer.py``).

Options: ``proxy_remote`` makes it a pull-through cache of another registry
(distribution's ``proxy: remoteurl:``, a mirror as fleets run one);
``tls=(certificate, key)`` serves HTTPS; ``port`` asks for a fixed port.
``halt()`` stops the process but keeps its port, config, storage and logs, and
``restart()`` starts it again on the same port (a mirror going away and
coming back).

The registry's own access log (Apache combined format on its stdout) is parsed
into ``AccessRecord`` entries, so a test or benchmark can count requests and
bytes by the registry's account::

    with RegistryServer() as reg:
        ...push/pull against reg.host...
        gets = [r for r in reg.access_log() if r.method == "GET" and "/blobs/" in r.path]

``AccessRecord.bytes`` is the body size the handler wrote as the registry logs
it; for HEAD that is the size of the body Go then discards (use
``AccessRecord.body_bytes`` for bytes that went on the wire).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

__all__ = [
    "DOCKER_REGISTRY",
    "AccessRecord",
    "HtpasswdAuth",
    "RegistryError",
    "RegistryServer",
    "TokenAuth",
    "free_port",
]

log = logging.getLogger(__name__)

DOCKER_REGISTRY = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class RegistryError(RuntimeError):
    """The registry could not be configured, started or stopped."""


@dataclass(frozen=True)
class HtpasswdAuth:
    """Basic auth against an htpasswd file of bcrypt entries made from ``users``."""

    users: dict[str, str]
    realm: str = "rafs-test"


@dataclass(frozen=True)
class TokenAuth:
    """Bearer-token auth: the registry verifies JWTs signed by a key chaining to
    ``rootcertbundle`` (PEM), issued by ``issuer`` for ``service``; clients are
    sent to ``realm`` (the token endpoint URL) by the ``WWW-Authenticate`` header."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


Auth = HtpasswdAuth | TokenAuth | None


@dataclass(frozen=True)
class AccessRecord:
    """One request as the registry's access log records it."""

    remote: str
    time: str
    method: str
    uri: str
    protocol: str
    status: int
    bytes: int
    user_agent: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.split("?", 1)[0]

    @property
    def body_bytes(self) -> int:
        """Body bytes sent on the wire (none for HEAD)."""
        return 0 if self.method == "HEAD" else self.bytes


_COMBINED = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] '
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<protocol>[^"]+)" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "(?:[^"\\]|\\.)*" "(?P<ua>(?:[^"\\]|\\.)*)"\s*$'
)


def parse_access_line(line: str) -> AccessRecord | None:
    """Parse one combined-format access log line; ``None`` for any other line."""
    m = _COMBINED.match(line)
    if m is None:
        return None
    size = m["bytes"]
    return AccessRecord(
        remote=m["remote"], time=m["time"], method=m["method"], uri=m["uri"],
        protocol=m["protocol"], status=int(m["status"]),
        bytes=0 if size == "-" else int(size), user_agent=m["ua"],
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must cope with a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd entry with a bcrypt hash (the only scheme distribution accepts)."""
    import bcrypt  # test extra; only needed for basic auth

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:{hashed}"


class RegistryServer:
    """A ``docker-registry`` process on 127.0.0.1; use as a context manager.

    ``storage``: a directory to keep blobs in (kept on stop); by default a
    temporary one that is removed on stop. ``auth``: ``None`` (anonymous),
    ``HtpasswdAuth`` or ``TokenAuth``. ``proxy_remote``: the URL of a registry
    to serve as a pull-through cache of. ``tls``: (certificate, key) PEM files
    to serve HTTPS with. ``port``: a fixed port (default: a free one).
    """

    def __init__(
        self,
        *,
        auth: Auth = None,
        storage: Path | None = None,
        binary: str = DOCKER_REGISTRY,
        start_timeout: float = START_TIMEOUT,
        proxy_remote: str | None = None,
        tls: tuple[Path, Path] | None = None,
        port: int | None = None,
    ) -> None:
        self.auth = auth
        self.binary = binary
        self.start_timeout = start_timeout
        self.proxy_remote = proxy_remote
        self.tls = tls
        self._fixed_port = port
        self._given_storage = Path(storage) if storage is not None else None
        self._workdir: Path | None = None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_mark = 0

    # -- addresses ---------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in ``docker://HOST/REPO:TAG``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def workdir(self) -> Path:
        """The started registry's private directory (config, logs, own storage)."""
        if self._workdir is None:
            raise RegistryError("registry not started")
        return self._workdir

    @property
    def storage(self) -> Path:
        """Where the registry keeps blobs: the given directory or ``workdir/storage``."""
        return self._given_storage or self.workdir / "storage"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def access_log_path(self) -> Path:
        """The registry's stdout: its access log in Apache combined format."""
        return self.workdir / "access.log"

    @property
    def log_path(self) -> Path:
        """The registry's stderr: its JSON application log."""
        return self.workdir / "registry.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ref(self, repository: str, tag: str = "latest") -> str:
        """``docker://127.0.0.1:PORT/REPOSITORY:TAG``."""
        return f"docker://{self.host}/{repository}:{tag}"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> RegistryServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the registry and wait until ``/v2/`` answers."""
        if self._proc is not None:
            raise RegistryError("registry already started")
        if not os.access(self.binary, os.X_OK):
            raise RegistryError(f"{self.binary} not found: install the docker-registry package")
        self._workdir = Path(tempfile.mkdtemp(prefix="rafs-registry-"))
        self.storage.mkdir(parents=True, exist_ok=True)
        auth_yaml = self._auth_yaml()
        last_error = ""
        for _attempt in range(5 if self._fixed_port is None else 1):
            self.port = self._fixed_port or free_port()
            self.config_path.write_text(self._config_yaml(auth_yaml))
            try:
                self._spawn()
            except _PortTaken as e:
                last_error = str(e)
                continue
            return
        raise RegistryError(f"registry could not bind a port: {last_error}")

    def _spawn(self) -> None:
        with open(self.access_log_path, "ab") as out, open(self.log_path, "ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        log.debug("registry pid %d listening on %s", self._proc.pid, self.host)

    def halt(self) -> None:
        """Stop the registry process; its port, config, storage and logs stay."""
        self._kill()

    def restart(self, timeout: float = 30.0) -> None:
        """Start a halted registry again, on the same port (retried while the port is
        still held by the old process's connections)."""
        if self._proc is not None:
            raise RegistryError("registry is running")
        self.workdir  # noqa: B018 - RegistryError if it was never started
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._spawn()
                return
            except _PortTaken:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the registry (idempotent) and remove what it made."""
        self._kill()
        # our config, logs and (unless the caller gave one) the storage
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # anything left in the group (there should be nothing)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(timeout=2.0, verify=False) as client:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    tail = self.log_tail()
                    if "address already in use" in tail:
                        raise _PortTaken(tail)
                    raise RegistryError(f"docker-registry exited with {rc}: {tail}")
                with contextlib.suppress(httpx.TransportError):
                    r = client.get(f"{self.url}/v2/")
                    if r.status_code in (200, 401):
                        return
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"docker-registry did not answer on {self.host} within "
                        f"{self.start_timeout}s: {self.log_tail()}"
                    )
                time.sleep(0.05)

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the registry's own (JSON) log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (FileNotFoundError, RegistryError):
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    # -- config ------------------------------------------------------------

    def _auth_yaml(self) -> str:
        auth = self.auth
        if auth is None:
            return ""
        if isinstance(auth, HtpasswdAuth):
            path = self.workdir / "htpasswd"
            path.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in auth.users.items()))
            return (
                "auth:\n"
                "  htpasswd:\n"
                f"    realm: {_q(auth.realm)}\n"
                f"    path: {_q(str(path))}\n"
            )
        if isinstance(auth, TokenAuth):
            return (
                "auth:\n"
                "  token:\n"
                f"    realm: {_q(auth.realm)}\n"
                f"    service: {_q(auth.service)}\n"
                f"    issuer: {_q(auth.issuer)}\n"
                f"    rootcertbundle: {_q(str(auth.rootcertbundle))}\n"
            )
        raise RegistryError(f"unknown auth mode {auth!r}")

    def _config_yaml(self, auth_yaml: str) -> str:
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  formatter: json\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {_q(str(self.storage))}\n"
            "  delete:\n"
            "    enabled: true\n"
            "  maintenance:\n"
            "    uploadpurging:\n"
            "      enabled: false\n"
            "http:\n"
            f"  addr: {_q(self.host)}\n"
            f"  secret: {_q(secrets.token_hex(16))}\n"
            + (f"  tls:\n    certificate: {_q(str(self.tls[0]))}\n"
               f"    key: {_q(str(self.tls[1]))}\n" if self.tls else "")
            + "health:\n"
            "  storagedriver:\n"
            "    enabled: false\n"
            + (f"proxy:\n  remoteurl: {_q(self.proxy_remote)}\n" if self.proxy_remote else "")
            + auth_yaml
        )

    # -- the registry's access log ------------------------------------------

    def access_log(self, *, since_mark: bool = False) -> list[AccessRecord]:
        """Every request the registry has logged (Apache combined format, parsed).

        With ``since_mark``, only those logged after the last ``mark()``.
        """
        try:
            data = self.access_log_path.read_bytes()
        except FileNotFoundError:
            return []
        if since_mark:
            data = data[self._log_mark:]
        lines = data.decode(errors="replace").splitlines()
        return [r for r in map(parse_access_line, lines) if r is not None]

    def mark(self) -> None:
        """Start a new window for ``access_log(since_mark=True)``."""
        try:
            self._log_mark = self.access_log_path.stat().st_size
        except FileNotFoundError:
            self._log_mark = 0

    def blob_gets(self, *, since_mark: bool = True) -> list[AccessRecord]:
        """Successful blob GETs (200/206) since the mark, by the registry's account."""
        return [
            r for r in self.access_log(since_mark=since_mark)
            if r.method == "GET" and "/blobs/" in r.path and r.status in (200, 206)
        ]


class _PortTaken(RegistryError):
    pass


def _q(value: str) -> str:
    """A YAML double-quoted scalar."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
