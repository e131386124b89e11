"""Authentication against real registries: htpasswd basic auth, and bearer
tokens from the test suite's issuer that docker-registry itself verifies.

Credentials come from --creds, REGISTRY_AUTH_FILE or ~/.docker/config.json;
wrong or missing ones give one clear line; an expired token is refreshed on
the registry's 401; a redirect to another host never carries the
Authorization header; no credential ever reaches a log.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rafs.auth import parse_challenge
from rafs.credentials import load_credentials
from rafs.errors import AuthError
from rafs.oci import parse_image_ref, sha256_digest
from rafs.registry import RegistryClient
from tests.helpers.edgecases import LAYERS
from tests.helpers.mounts import mounted, rafs_cmd, read_stats
from tests.helpers.ocibuild import build_oci_image
from tests.helpers.procs import run
from tests.helpers.registries import READER_PASSWORD, READER_USER


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("auth-src") / "layout"
    build_oci_image(src, "edge", LAYERS)
    return f"oci:{src}:edge"


def _docker_config(path: Path, host: str, user: str, password: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (path / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path / "config.json"


def _one_line_error(res, *needles: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.startswith("rafs: error: ") and res.stderr.count("\n") == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["basic", "token"])
def test_push_and_mount_with_credentials_from_each_source(
    kind, request, small_image, tmp_path
):
    reg = request.getfixturevalue(f"registry_{kind}")
    ref = reg.ref(f"auth/{kind}", "rafs")
    res = run(rafs_cmd("-vv", "convert", small_image, ref, "--no-progress",
                       "--creds", reg.creds), timeout=120)
    assert res.returncode == 0, res.stderr
    assert reg.password not in res.stderr + res.stdout
    assert base64.b64encode(reg.creds.encode()).decode() not in res.stderr

    # From REGISTRY_AUTH_FILE, then from the docker config in $DOCKER_CONFIG.
    auth_file = _docker_config(tmp_path / "auth", reg.host, reg.user, reg.password)
    docker_dir = _docker_config(tmp_path / "docker", reg.host, reg.user, reg.password).parent
    for env in ({"REGISTRY_AUTH_FILE": str(auth_file)}, {"DOCKER_CONFIG": str(docker_dir)}):
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", env=env) as mnt:
            assert sorted(p.name for p in mnt.iterdir())
    # From --creds: they reach the daemon through a pipe, never its argv or environment.
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache",
                 env={"DOCKER_CONFIG": str(tmp_path / "empty")},
                 extra_args=["--creds", reg.creds]) as mnt:
        assert sorted(p.name for p in mnt.iterdir())
        stats = read_stats(mnt)
        for pid in {stats["pid"], stats.get("owner_pid", stats["pid"])}:  # worker, supervisor
            for what in ("cmdline", "environ"):
                assert reg.password.encode() not in Path(f"/proc/{pid}/{what}").read_bytes()
    run_dir = Path(os.environ["RAFS_RUN_DIR"])  # the daemon logs never hold the password
    for daemon_log in run_dir.rglob("*.log"):
        assert reg.password not in daemon_log.read_text(errors="replace")


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_missing_or_wrong_credentials_are_one_clear_line(kind, request, small_image, tmp_path):
    reg = request.getfixturevalue(f"registry_{kind}")
    ref = reg.ref(f"auth/{kind}-denied", "rafs")
    env = {"DOCKER_CONFIG": str(tmp_path / "empty")}  # no ~/.docker of the host
    res = run(rafs_cmd("convert", small_image, ref, "--no-progress"), env=env, timeout=120)
    _one_line_error(res, "requires credentials", "--creds")
    res = run(rafs_cmd("convert", small_image, ref, "--no-progress", "--creds",
                       f"{reg.user}:not-the-password"), env=env, timeout=120)
    _one_line_error(res, "wrong credentials" if kind == "token" else "refused the credentials")
    assert "not-the-password" not in res.stderr
    (tmp_path / "mnt").mkdir()
    res = run(rafs_cmd("mount", ref, tmp_path / "mnt", "--cache-dir", tmp_path / "c",
                       "--creds", f"{reg.user}:not-the-password"), env=env, timeout=120)
    assert res.returncode == 1 and "not-the-password" not in res.stderr


def test_a_pull_only_user_cannot_push(registry_token, small_image, tmp_path):
    ref = registry_token.ref("auth/readonly", "rafs")
    res = run(rafs_cmd("convert", small_image, ref, "--no-progress", "--creds",
                       f"{READER_USER}:{READER_PASSWORD}"), timeout=120)
    _one_line_error(res, registry_token.host)


def test_an_expired_token_is_refreshed(registry_token, small_image, monkeypatch):
    reg = registry_token
    ref = reg.ref("auth/expiry", "rafs")
    res = run(rafs_cmd("convert", small_image, ref, "--no-progress", "--creds", reg.creds),
              timeout=120)
    assert res.returncode == 0, res.stderr
    monkeypatch.setattr(reg.issuer, "expires_in", 1)
    with RegistryClient(reg.host, creds=(reg.user, reg.password)) as client:
        repo = "auth/expiry"
        manifest = client.resolve(parse_image_ref(ref))
        before = len(reg.issuer.requests)
        time.sleep(2.5)  # the token the client holds has expired now
        data = client.get_blob(repo, manifest.config.digest, 1 << 20)
        assert sha256_digest(data) == manifest.config.digest
        assert len(reg.issuer.requests) > before


# -- without a registry: credential sources, challenges, redirects ---------------


def test_credentials_come_from_the_auth_file_before_the_docker_config(tmp_path, monkeypatch):
    auth_file = _docker_config(tmp_path / "a", "reg.example:5000", "alice", "one")
    docker = _docker_config(tmp_path / "d", "reg.example:5000", "bob", "two").parent
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    assert load_credentials("reg.example:5000") == ("bob", "two")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    assert load_credentials("reg.example:5000") == ("alice", "one")
    assert load_credentials("reg.example:5000", ("carol", "three")) == ("carol", "three")
    assert load_credentials("other.example") is None
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(AuthError, match="cannot read credentials"):
        load_credentials("reg.example:5000")


def test_challenges_parse_with_quoted_commas():
    c = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                        'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}


@pytest.fixture
def redirecting_pair() -> Iterator[tuple[str, list[dict[str, str]], list[dict[str, str]]]]:
    """A registry-shaped server on 127.0.0.1 that wants Basic auth and redirects
    blob GETs to a second server reached as ``localhost`` (another host, as
    httpx sees it): (first host, headers seen by each). The filesystem
    docker-registry never redirects, so this fault needs a stand-in."""
    blob = b"redirected blob"
    seen_first: list[dict[str, str]] = []
    seen_second: list[dict[str, str]] = []

    class Second(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen_second.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

    second = ThreadingHTTPServer(("127.0.0.1", 0), Second)

    class First(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen_first.append(dict(self.headers))
            if "Authorization" not in self.headers:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="x"')
                self.send_header("Content-Length", "0")
            else:
                self.send_response(307)
                self.send_header("Location", f"http://localhost:{second.server_port}/data")
                self.send_header("Content-Length", "0")
            self.end_headers()

    first = ThreadingHTTPServer(("127.0.0.1", 0), First)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (first, second)]
    for t in threads:
        t.start()
    try:
        yield f"127.0.0.1:{first.server_port}", seen_first, seen_second
    finally:
        for s in (first, second):
            s.shutdown()
            s.server_close()


def test_a_redirect_to_another_host_carries_no_authorization(redirecting_pair):
    host, seen_first, seen_second = redirecting_pair
    digest = sha256_digest(b"redirected blob")
    with RegistryClient(host, creds=("user", "secret")) as client:
        assert client.get_blob("r", digest, 1 << 10) == b"redirected blob"
    assert any("Authorization" in h for h in seen_first)
    assert seen_second and all("Authorization" not in h for h in seen_second)
