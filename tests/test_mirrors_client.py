"""The registry client's endpoints, against faults a real mirror cannot give on demand.

``httpx.MockTransport`` plays a mirror and the origin (by host): a failing
mirror is passed over, marked down once (one log line), skipped, probed after
its backoff and used again when it answers; capabilities decide which
endpoint may resolve a tag, serve a digest or take a push; requests to a
mirror carry ``ns=`` and the file's headers, under its API root; a manifest
or a blob that does not match its digest comes from the next endpoint, and the
mirror is distrusted; each endpoint gets its own credentials; a range read
resumes on the next endpoint from its first missing byte; a stall the caller
cuts off counts against the mirror. The real-registry tests are in
tests/test_mirrors.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from rafs.errors import ConfigError
from rafs.hosts import parse_hosts
from rafs.oci import MEDIA_TYPE_OCI_MANIFEST, ImageRef
from rafs.registry import AsyncRegistryClient, RegistryClient
from rafs.retry import RetryPolicy

ORIGIN = "origin.test"
MIRROR = "mirror.test"
REPO = "lib/img"
FAST = RetryPolicy(retries=1, base=0.001, cap=0.001, jitter=0.0)
DATA = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": DIGEST, "size": len(DATA)},
                       "layers": []}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
Fault = Callable[[httpx.Request], httpx.Response | None]


@pytest.fixture(autouse=True)
def _no_host_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


class Net:
    """Both hosts: each serves the manifest and the blob (Range honoured) under any
    API root, unless a fault for its host answers first."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.faults: dict[str, Fault] = {}

    def on(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.get(request.url.host)
        if fault is not None and (response := fault(request)) is not None:
            return response
        return answer(request)


def answer(request: httpx.Request, data: bytes = DATA,
           stream: httpx.AsyncByteStream | None = None) -> httpx.Response:
    path = request.url.path
    if "/manifests/" in path:
        return httpx.Response(200, content=MANIFEST, headers={
            "content-type": MEDIA_TYPE_OCI_MANIFEST, "docker-content-digest": MANIFEST_DIGEST})
    if f"/{REPO}/blobs/" in path:
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-length": str(len(data))})
        rng = request.headers.get("range")
        if rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            a, b = int(first), int(last) + 1 if last else len(data)
            headers = {"content-range": f"bytes {a}-{b - 1}/{len(data)}"}
            if stream is not None:
                return httpx.Response(206, headers=headers, stream=stream)
            return httpx.Response(206, content=data[a:b], headers=headers)
        return httpx.Response(200, content=data)
    if "/blobs/uploads/" in path:
        return httpx.Response(404)
    return httpx.Response(404)


def hosts(text: str):
    return parse_hosts(text, ORIGIN, base_dir=Path("/nonexistent"), name="test/hosts.toml")


MIRRORED = (f'server = "https://{ORIGIN}"\n'
            f'[host."https://{MIRROR}"]\ncapabilities = ["pull", "resolve"]\n')


def client(net: Net, text: str = MIRRORED, **kwargs) -> RegistryClient:
    return RegistryClient(ORIGIN, hosts=hosts(text), transport=httpx.MockTransport(net),
                          retry=FAST, **kwargs)


def test_a_failing_mirror_is_passed_over_marked_down_once_and_probed_again(
        caplog: pytest.LogCaptureFixture) -> None:
    net = Net()
    net.faults[MIRROR] = lambda r: httpx.Response(503)
    with caplog.at_level(logging.INFO, logger="rafs.endpoints"), client(net) as c:
        mirror, origin = c.endpoints
        assert c.get_blob(REPO, DIGEST, len(DATA)) == DATA
        assert c.health[mirror].state == "down" and c.health[mirror].errors == 1
        assert len(net.on(MIRROR)) == 1 and len(net.on(ORIGIN)) == 1
        for _ in range(3):  # down: not asked, no new log line
            assert c.get_blob(REPO, DIGEST, len(DATA)) == DATA
        assert len(net.on(MIRROR)) == 1
        c.health[mirror].retry_at = 0.0  # the backoff has passed: the next request probes
        assert c.get_blob(REPO, DIGEST, len(DATA)) == DATA
        assert len(net.on(MIRROR)) == 2 and c.health[mirror].state == "down"
        del net.faults[MIRROR]  # healed
        c.health[mirror].retry_at = 0.0
        before = len(net.on(ORIGIN))
        assert c.get_blob(REPO, DIGEST, len(DATA)) == DATA
        assert c.health[mirror].state == "up" and len(net.on(ORIGIN)) == before
        assert c.health[origin].requests == before and c.health[mirror].bytes == len(DATA)
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    ups = [r for r in caplog.records if "is back up" in r.getMessage()]
    assert len(downs) == 1 and downs[0].levelno == logging.WARNING
    assert len(ups) == 1 and ups[0].levelno == logging.INFO


def test_a_tag_is_resolved_only_where_trusted_digests_and_blobs_use_a_pull_mirror() -> None:
    net = Net()
    text = f'[host."https://{MIRROR}"]\ncapabilities = ["pull"]\n'
    with client(net, text) as c:
        manifest = c.resolve(ImageRef("docker", f"{ORIGIN}/{REPO}", "v1"))
        assert [r.url.host for r in net.requests] == [ORIGIN]
        c.get_manifest(REPO, manifest.digest)
        c.get_blob(REPO, DIGEST, len(DATA))
        assert [r.url.host for r in net.requests] == [ORIGIN, MIRROR, MIRROR]


def test_requests_to_a_mirror_carry_ns_and_its_headers_under_its_api_root() -> None:
    net = Net()
    text = (f'[host."https://{MIRROR}/v2/upstream"]\noverride_path = true\n'
            f'[host."https://{MIRROR}/v2/upstream".header]\nx-token = ["a", "b"]\n')
    with client(net, text) as c:
        c.get_blob(REPO, DIGEST, len(DATA))
    (r,) = net.requests
    assert r.url.path == f"/v2/upstream/{REPO}/blobs/{DIGEST}"
    assert r.url.params["ns"] == ORIGIN
    assert r.headers.get_list("x-token") == ["a", "b"]
    with client(net, "") as c:  # the registry itself: no ns
        c.get_blob(REPO, DIGEST, len(DATA))
    assert "ns" not in net.requests[-1].url.params


def test_a_mirror_manifest_or_blob_that_does_not_match_comes_from_the_origin() -> None:
    net = Net()
    bad = bytearray(DATA)
    bad[1234] ^= 0xFF

    def lying(request: httpx.Request) -> httpx.Response | None:
        if "/manifests/" in request.url.path:
            return httpx.Response(200, content=MANIFEST + b" ", headers={
                "content-type": MEDIA_TYPE_OCI_MANIFEST})
        return answer(request, bytes(bad))

    net.faults[MIRROR] = lying
    with client(net) as c:
        mirror, _ = c.endpoints
        raw, _, digest = c.get_manifest(REPO, MANIFEST_DIGEST)
        assert raw == MANIFEST and digest == MANIFEST_DIGEST
        assert c.health[mirror].digest_errors == 1
        c.health[mirror].retry_at = 0.0
        assert c.get_blob(REPO, DIGEST, len(DATA)) == DATA
        assert c.health[mirror].digest_errors == 2
        assert [r.url.host for r in net.requests] == [MIRROR, ORIGIN, MIRROR, ORIGIN]


def test_pushes_go_only_to_endpoints_that_may_push() -> None:
    net = Net()
    with client(net) as c:
        assert c.head_blob(REPO, DIGEST) == len(DATA)  # a pull: the mirror
        assert net.on(MIRROR)
        assert c.push_blob(REPO, DIGEST, len(DATA), DATA) is False  # the origin has it
        c.put_manifest(REPO, "v1", MANIFEST, MEDIA_TYPE_OCI_MANIFEST)
        pushes = net.requests[1:]
        assert [(r.method, r.url.host) for r in pushes] == [("HEAD", ORIGIN), ("PUT", ORIGIN)]
    with pytest.raises(ConfigError, match=r"no endpoint of origin\.test may push"), client(
            net, f'server = "https://{MIRROR}"\ncapabilities = ["pull", "resolve"]\n') as c:
        c.put_manifest(REPO, "v1", MANIFEST, MEDIA_TYPE_OCI_MANIFEST)


def test_each_endpoint_gets_only_its_own_credentials(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "docker"
    config.mkdir()

    def auth(user: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}

    (config / "config.json").write_text(json.dumps(
        {"auths": {MIRROR: auth("mirror-user"), ORIGIN: auth("origin-user")}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    net = Net()
    seen: dict[str, str] = {}

    def basic(request: httpx.Request) -> httpx.Response | None:
        given = request.headers.get("authorization")
        if not given:
            return httpx.Response(401, headers={"www-authenticate": 'Basic realm="x"'})
        seen[request.url.host] = base64.b64decode(given.split()[1]).decode()
        return None

    net.faults[MIRROR] = basic
    net.faults[ORIGIN] = basic
    with client(net, creds=("explicit", "secret")) as c:
        c.get_blob(REPO, DIGEST, len(DATA))
        net.faults[MIRROR] = lambda r: httpx.Response(503)
        c.get_blob(REPO, DIGEST, len(DATA))
    assert seen == {MIRROR: "mirror-user:pw", ORIGIN: "explicit:secret"}


class _Stalling(httpx.AsyncByteStream):
    """A body that sends ``head`` bytes, then nothing, ever."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        await trio.sleep(3600)


class _Breaking(httpx.AsyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset by peer")


def _async_client(net: Net, timeout: float = 30.0) -> AsyncRegistryClient:
    return AsyncRegistryClient(ORIGIN, hosts=hosts(MIRRORED), transport=httpx.MockTransport(net),
                               retry=FAST, timeout=timeout)


def test_a_range_read_resumes_on_the_next_endpoint_from_its_first_missing_byte() -> None:
    net = Net()
    net.faults[MIRROR] = lambda r: answer(r, stream=_Breaking(DATA[1000:1000 + 5000]))

    async def main() -> tuple[bytes, list]:
        sources: list = []
        async with _async_client(net) as c:
            got = b"".join([p async for p in c.stream_range(REPO, DIGEST, 1000, 50_000,
                                                           sources=sources)])
            return got, [(off, e.host) for off, e in sources]

    got, sources = trio.run(main)
    assert got == DATA[1000:51_000]
    assert sources == [(1000, MIRROR), (6000, ORIGIN)]
    assert net.on(ORIGIN)[0].headers["range"] == "bytes=6000-50999"


def test_a_stall_the_caller_cuts_off_counts_against_the_mirror() -> None:
    net = Net()
    net.faults[MIRROR] = lambda r: answer(r, stream=_Stalling(DATA[:100]))

    async def main() -> tuple[dict, bytes]:
        async with _async_client(net, timeout=0.3) as c:
            mirror, _ = c.endpoints
            with trio.move_on_after(0.5):  # the fetcher's idle timeout
                async for _ in c.stream_range(REPO, DIGEST, 0, 10_000):
                    pass
            state = c.health[mirror].snapshot()
            again = b"".join([p async for p in c.stream_range(REPO, DIGEST, 0, 10_000)])
            return state, again

    state, again = trio.run(main)
    assert state["stalls"] == 1 and state["state"] == "down"
    assert again == DATA[:10_000]
    assert [r.url.host for r in net.requests] == [MIRROR, ORIGIN]
