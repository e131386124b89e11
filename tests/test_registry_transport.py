"""The registry client against faults a real registry cannot produce on demand.

Both clients (blocking and async) run the same flows; each test here runs
against both through ``httpx.MockTransport`` (the ``transport=`` argument):
a 206 that names the wrong range, a 200 to a Range request, a body cut
mid-way by a reset (counted as ``truncated``, never ``connection``) and the
resumption from the first missing byte, a redirect to another host (no
Authorization there), Retry-After and the rising log level, the spent retry
budget, the mapping of answers to the error tree, and manifests that do not
match their digest. The real-registry tests are in tests/test_registry*.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from rafs.errors import AuthError, BackendError, DigestError, ImageError, TransientError
from rafs.oci import MEDIA_TYPE_OCI_MANIFEST, parse_image_ref
from rafs.registry import MAX_MANIFEST, AsyncRegistryClient, RegistryClient
from rafs.retry import RetryPolicy

HOST = "registry.test"
REPO = "lib/img"
FAST = RetryPolicy(retries=3, base=0.001, cap=0.001, jitter=0.0, retry_after_cap=0.2)
DATA = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _no_host_credentials(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


class _Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body for either client: ``data`` in pieces, then ``error`` if given."""

    def __init__(self, data: bytes, error: Exception | None = None, piece: int = 8192) -> None:
        self.data, self.error, self.piece = data, error, piece

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.piece):
            yield self.data[i:i + self.piece]
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self:
            yield piece


@dataclass
class Registry:
    """A registry-shaped handler: one blob, Range support, and a queue of faults
    (callables that answer one matching request instead of the registry)."""

    requests: list[httpx.Request] = field(default_factory=list)
    faults: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    manifests: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.faults:
            return self.faults.pop(0)(request)
        return self.answer(request)

    def answer(self, request: httpx.Request, *, honour_range: bool = True) -> httpx.Response:
        path = request.url.path
        if path.startswith(f"/v2/{REPO}/manifests/"):
            found = self.manifests.get(path.rsplit("/", 1)[1])
            if found is None:
                return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            raw, headers = found
            return httpx.Response(200, content=raw, headers={
                "Content-Type": MEDIA_TYPE_OCI_MANIFEST, **headers})
        if path != f"/v2/{REPO}/blobs/{DIGEST}":
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))})
        wanted = request.headers.get("range")
        if not wanted or not honour_range:
            return _answer(200, DATA, {})
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        assert m is not None, wanted
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else len(DATA) - 1
        return _answer(206, DATA[first:last + 1],
                       {"Content-Range": f"bytes {first}-{last}/{len(DATA)}"})

    def ranges(self) -> list[str | None]:
        return [r.headers.get("range") for r in self.requests]


def _answer(status: int, body: bytes, headers: dict[str, str], *,
            cut_at: int | None = None, error: Exception | None = None) -> httpx.Response:
    """An answer whose Content-Length says ``body``; with ``cut_at`` only that many
    bytes come, then ``error`` (or a clean early end)."""
    sent = body if cut_at is None else body[:cut_at]
    return httpx.Response(status, headers={"Content-Length": str(len(body)), **headers},
                          stream=_Body(sent, error))


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]},
                          headers=headers or {})


def _raising(error: type[httpx.TransportError], message: str
             ) -> Callable[[httpx.Request], httpx.Response]:
    """A fault that fails the request before any answer."""
    def fault(request: httpx.Request) -> httpx.Response:
        raise error(message, request=request)

    return fault


@dataclass
class Driver:
    """One client kind behind one interface, so each test runs against both."""

    kind: str
    handler: Callable[[httpx.Request], httpx.Response]
    client_args: dict[str, Any]
    last: Any = None  # the client of the last call (for its counters)

    def client(self) -> Any:
        transport = httpx.MockTransport(self.handler)
        cls = RegistryClient if self.kind == "sync" else AsyncRegistryClient
        self.last = cls(HOST, insecure=True, transport=transport,
                        **{"retry": FAST, **self.client_args})
        return self.last

    def call(self, method: str, *args: Any) -> Any:
        """``client.method(*args)`` (a range: its pieces, as a list) on a fresh client."""
        if self.kind == "sync":
            with self.client() as client:
                result = getattr(client, method)(*args)
                return list(result) if method == "stream_range" else result

        async def run() -> Any:
            async with self.client() as client:
                result = getattr(client, method)(*args)
                if method == "stream_range":
                    return [piece async for piece in result]
                return await result

        return trio.run(run)


@pytest.fixture(params=["sync", "async"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def driver(kind, registry) -> Driver:
    return Driver(kind, registry, {})


# -- ranges ---------------------------------------------------------------------------


def test_a_206_with_the_wrong_content_range_delivers_nothing_and_is_a_range_error(
        driver, registry):
    registry.faults.append(lambda r: _answer(206, DATA[:1000], {
        "Content-Range": f"bytes 0-999/{len(DATA)}"}))
    with pytest.raises(TransientError, match="answered bytes") as e:
        driver.call("stream_range", REPO, DIGEST, 5000, 1000)
    assert e.value.error_class == "range"
    assert registry.ranges() == ["bytes=5000-5999"]


def test_a_206_without_content_range_is_a_range_error(driver, registry):
    registry.faults.append(lambda r: _answer(206, DATA[5000:6000], {}))
    with pytest.raises(TransientError) as e:
        driver.call("stream_range", REPO, DIGEST, 5000, 1000)
    assert e.value.error_class == "range"


def test_a_whole_blob_download_retries_a_wrong_range_and_gets_the_right_bytes(
        driver, registry):
    registry.faults += [
        lambda r: _answer(200, DATA, {}, cut_at=100_000, error=httpx.ReadError("reset")),
        lambda r: _answer(206, DATA[:10], {"Content-Range": f"bytes 0-9/{len(DATA)}"}),
    ]
    data = driver.call("get_blob", REPO, DIGEST, 1 << 20)
    counters = driver.last.counters
    assert data == DATA
    assert registry.ranges() == [None, "bytes=100000-299999", "bytes=100000-299999"]
    assert counters.retries == 2


def test_a_200_to_a_range_request_gives_the_right_bytes_and_is_counted(
        driver, registry, caplog):
    registry.faults += [lambda r: registry.answer(r, honour_range=False)] * 2
    client = driver.client()

    async def two_reads() -> list[bytes]:
        async with client:
            return [b"".join([p async for p in client.stream_range(REPO, DIGEST, o, 700)])
                    for o in (1000, 250_000)]

    with caplog.at_level(logging.WARNING, logger="rafs.registry"):
        if driver.kind == "sync":
            with client:
                got = [b"".join(client.stream_range(REPO, DIGEST, o, 700))
                       for o in (1000, 250_000)]
        else:
            got = trio.run(two_reads)
    assert got == [DATA[1000:1700], DATA[250_000:250_700]]
    assert client.counters.range_ignored == 2
    warnings = [r for r in caplog.records if "ignored a Range request" in r.getMessage()]
    assert len(warnings) == 1  # once per blob


def test_a_206_longer_than_asked_is_trimmed(driver, registry):
    registry.faults.append(lambda r: _answer(206, DATA[10:5000], {
        "Content-Range": f"bytes 10-4999/{len(DATA)}"}))
    assert b"".join(driver.call("stream_range", REPO, DIGEST, 10, 90)) == DATA[10:100]


def test_a_short_206_is_truncated_after_the_bytes_that_came(driver, registry):
    registry.faults.append(lambda r: _answer(206, DATA[10:60], {
        "Content-Range": f"bytes 10-59/{len(DATA)}"}))
    pieces: list[bytes] = []
    with pytest.raises(TransientError) as e:
        _collect(driver, pieces, 10, 90)
    assert e.value.error_class == "truncated"
    assert b"".join(pieces) == DATA[10:60]


# -- bodies cut mid-way (issue 18: a reset after the answer began is `truncated`) -----


def _collect(driver: Driver, pieces: list[bytes], offset: int, length: int) -> None:
    """Read a range into ``pieces`` as they come, so a failure keeps what arrived."""
    if driver.kind == "sync":
        with driver.client() as client:
            for piece in client.stream_range(REPO, DIGEST, offset, length):
                pieces.append(piece)
        return

    async def run() -> None:
        async with driver.client() as client:
            async for piece in client.stream_range(REPO, DIGEST, offset, length):
                pieces.append(piece)

    trio.run(run)


@pytest.mark.parametrize("cut", ["reset", "protocol", "clean"])
def test_a_body_cut_mid_way_is_truncated_and_only_right_bytes_came(cut, driver, registry):
    error = {"reset": httpx.ReadError("[Errno 104] Connection reset by peer"),
             "protocol": httpx.RemoteProtocolError("peer closed connection"),
             "clean": None}[cut]
    registry.faults.append(lambda r: _answer(
        206, DATA[1000:201_000], {"Content-Range": f"bytes 1000-200999/{len(DATA)}"},
        cut_at=50_000, error=error))
    pieces: list[bytes] = []
    with pytest.raises(TransientError) as e:
        _collect(driver, pieces, 1000, 200_000)
    assert e.value.error_class == "truncated"
    assert b"".join(pieces) == DATA[1000:51_000]


@pytest.mark.parametrize(("fault", "error_class"), [
    (_raising(httpx.ReadError, "[Errno 104] Connection reset by peer"), "connection"),
    (_raising(httpx.ConnectError, "[Errno 111] Connection refused"), "connection"),
    (_raising(httpx.RemoteProtocolError, "Server disconnected"), "connection"),
    (_raising(httpx.ReadTimeout, "timed out"), "timeout"),
])
def test_failures_before_an_answer_are_connection_or_timeout(fault, error_class, driver,
                                                             registry):
    registry.faults.append(fault)
    with pytest.raises(TransientError) as e:
        driver.call("stream_range", REPO, DIGEST, 0, 100)
    assert e.value.error_class == error_class


def test_a_timeout_mid_body_stays_a_timeout(driver, registry):
    registry.faults.append(lambda r: _answer(
        206, DATA[:10_000], {"Content-Range": f"bytes 0-9999/{len(DATA)}"},
        cut_at=5000, error=httpx.ReadTimeout("timed out")))
    with pytest.raises(TransientError) as e:
        driver.call("stream_range", REPO, DIGEST, 0, 10_000)
    assert e.value.error_class == "timeout"


def test_a_download_resumes_from_the_first_missing_byte(driver, registry):
    registry.faults += [
        lambda r: _answer(200, DATA, {}, cut_at=70_000, error=httpx.ReadError("reset")),
        lambda r: _answer(206, DATA[70_000:], {
            "Content-Range": f"bytes 70000-{len(DATA) - 1}/{len(DATA)}"},
            cut_at=100_000, error=httpx.RemoteProtocolError("closed")),
    ]
    data = driver.call("get_blob", REPO, DIGEST, 1 << 20)
    counters = driver.last.counters
    assert data == DATA
    assert registry.ranges() == [None, "bytes=70000-299999", "bytes=170000-299999"]
    assert counters.retries == 2 and counters.requests == 3


def test_a_download_that_keeps_progressing_is_not_limited_by_the_retry_count(
        driver, registry):
    def cut(start: int) -> Callable[[httpx.Request], httpx.Response]:
        return lambda r: _answer(206, DATA[start:], {
            "Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"},
            cut_at=20_000, error=httpx.ReadError("reset"))

    registry.faults.append(lambda r: _answer(200, DATA, {}, cut_at=20_000,
                                             error=httpx.ReadError("reset")))
    registry.faults += [cut(20_000 * k) for k in range(1, 8)]  # more cuts than retries
    assert driver.call("get_blob", REPO, DIGEST, 1 << 20) == DATA


def test_a_blob_that_differs_from_its_digest_is_refused(driver, registry):
    registry.faults.append(lambda r: _answer(200, DATA[:-1] + b"\0", {}))
    with pytest.raises(DigestError, match="does not match its digest"):
        driver.call("get_blob", REPO, DIGEST, 1 << 20)


def test_a_blob_over_its_size_cap_is_refused(driver):
    with pytest.raises(ImageError, match="larger than"):
        driver.call("get_blob", REPO, DIGEST, len(DATA) - 1)


# -- redirects and credentials ------------------------------------------------------------


def test_a_redirect_to_another_host_carries_no_authorization(kind):
    seen: dict[str, list[httpx.Headers]] = {HOST: [], "storage.test": []}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host].append(request.headers)
        if request.url.host == "storage.test":
            return httpx.Response(200, content=DATA)
        if "authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(307, headers={"Location": "http://storage.test/data?sig=x"})

    driver = Driver(kind, handler, {"creds": ("user", "secret")})
    assert driver.call("get_blob", REPO, DIGEST, 1 << 20) == DATA
    assert any("authorization" in h for h in seen[HOST])
    assert seen["storage.test"] and all("authorization" not in h for h in seen["storage.test"])


def test_a_registry_that_wants_credentials_says_so_in_one_line(kind):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    with pytest.raises(AuthError, match="requires credentials") as e:
        Driver(kind, handler, {}).call("get_blob", REPO, DIGEST, 1 << 20)
    assert "\n" not in str(e.value)


# -- retries ------------------------------------------------------------------------------


def test_retry_after_is_honoured_and_the_log_level_rises(driver, registry, caplog):
    registry.faults += [lambda r: _error(429, "TOOMANYREQUESTS", "slow down",
                                         {"Retry-After": "0.05"})] * 2
    with caplog.at_level(logging.INFO, logger="rafs.registry"):
        assert driver.call("get_blob", REPO, DIGEST, 1 << 20) == DATA
    retries = [r for r in caplog.records if "retry " in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.INFO, logging.WARNING]
    assert all("rate limiting (429)" in r.getMessage() and "in 0.05s" in r.getMessage()
               for r in retries)


def test_a_retry_after_beyond_the_cap_is_cut_to_it(driver, registry, caplog):
    registry.faults.append(lambda r: _error(503, "UNAVAILABLE", "down",
                                            {"Retry-After": "3600"}))
    with caplog.at_level(logging.INFO, logger="rafs.registry"):
        assert driver.call("get_blob", REPO, DIGEST, 1 << 20) == DATA
    assert any("in 0.20s" in r.getMessage() for r in caplog.records)


def test_when_the_retries_are_spent_the_last_error_is_raised(driver, registry):
    registry.faults += [lambda r: _error(503, "UNAVAILABLE", "maintenance")] * 10
    text = re.escape("answered 503 (UNAVAILABLE: maintenance)")
    with pytest.raises(TransientError, match=text) as e:
        driver.call("get_blob", REPO, DIGEST, 1 << 20)
    assert e.value.error_class == "5xx"
    assert len(registry.requests) == FAST.attempts


def test_a_range_read_is_one_attempt(driver, registry):
    registry.faults.append(lambda r: _error(503, "UNAVAILABLE", "maintenance"))
    with pytest.raises(TransientError):
        driver.call("stream_range", REPO, DIGEST, 0, 100)
    assert len(registry.requests) == 1


@pytest.mark.parametrize(("status", "error", "text"), [
    (401, AuthError, "refused the credentials"),
    (403, AuthError, "access denied"),
    (404, ImageError, "not found in registry.test (BLOB_UNKNOWN: gone)"),
    (400, BackendError, "answered 400 (BAD: nope)"),
])
def test_answers_map_to_the_error_tree_without_retries(status, error, text, driver, registry):
    code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 400: "BAD"}[status]
    message = {404: "gone", 400: "nope"}.get(status, "no")
    registry.faults.append(lambda r: _error(status, code, message))
    with pytest.raises(error, match=re.escape(text)) as e:
        driver.call("get_blob", REPO, DIGEST, 1 << 20)
    assert not isinstance(e.value, TransientError)
    assert len(registry.requests) == 1


# -- manifests ----------------------------------------------------------------------------


def _manifest() -> tuple[bytes, str]:
    raw = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": DIGEST, "size": len(DATA)},
                      "layers": []}).encode()
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def test_a_manifest_is_checked_against_the_digest_it_was_asked_by(driver, registry):
    raw, digest = _manifest()
    registry.manifests["v1"] = (raw, {})
    registry.manifests[digest] = (raw, {})
    assert driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}:v1")).digest == digest
    assert driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}@{digest}")).raw == raw
    other = "sha256:" + "1" * 64
    registry.manifests[other] = (raw, {})
    with pytest.raises(DigestError, match=f"expected {other}"):
        driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}@{other}"))


def test_a_manifest_the_registry_names_otherwise_is_refused(driver, registry):
    raw, _ = _manifest()
    registry.manifests["v1"] = (raw, {"Docker-Content-Digest": "sha256:" + "2" * 64})
    with pytest.raises(DigestError):
        driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}:v1"))


def test_a_huge_manifest_is_refused_before_it_is_read_whole(driver, registry):
    registry.faults.append(lambda r: _answer(200, b" " * (4 * MAX_MANIFEST), {}))
    with pytest.raises(ImageError, match="larger than"):
        driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}:v1"))


# -- one implementation ------------------------------------------------------------------


def test_both_clients_send_the_same_requests():
    requests: dict[str, list[tuple[str, str, str | None]]] = {}
    for kind in ("sync", "async"):
        registry = Registry()
        raw, _ = _manifest()
        registry.manifests["v1"] = (raw, {})
        driver = Driver(kind, registry, {})
        driver.call("resolve", parse_image_ref(f"docker://{HOST}/{REPO}:v1"))
        registry.faults.append(lambda r: _answer(200, DATA, {}, cut_at=1000,
                                                 error=httpx.ReadError("reset")))
        driver.call("get_blob", REPO, DIGEST, 1 << 20)
        driver.call("stream_range", REPO, DIGEST, 10, 20)
        driver.call("head_blob", REPO, DIGEST)
        requests[kind] = [(r.method, str(r.url), r.headers.get("range"))
                          for r in registry.requests]
    assert requests["sync"] == requests["async"]
    assert len(requests["sync"]) == 5
