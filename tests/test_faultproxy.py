"""The fault proxy relays real registry traffic faithfully and produces each fault
it promises, as a plain httpx client sees it."""

from __future__ import annotations

import hashlib
import os
import threading

import httpx
import pytest

from tests.helpers.faultproxy import Fault, FaultProxy

REPO = "faultproxy/selftest"


@pytest.fixture(scope="module")
def blob(registry) -> tuple[str, bytes]:
    """(digest, data) of a 256 KiB blob pushed straight to the registry."""
    data = os.urandom(256 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(f"{registry.url}/v2/{REPO}/blobs/uploads/")
    assert start.status_code == 202, start.text
    r = httpx.put(_with_digest(start.headers["location"], digest), content=data,
                  headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest, data


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def client():
    with httpx.Client(transport=httpx.HTTPTransport(retries=0), timeout=10) as c:
        yield c


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + digest


def _blob_url(proxy: FaultProxy, digest: str) -> str:
    return f"{proxy.url}/v2/{REPO}/blobs/{digest}"


def _is_blob_get(req) -> bool:
    return req.method == "GET" and "/blobs/" in req.path


def test_relays_ranges_and_records_each_exchange(proxy, client, blob):
    digest, data = blob
    url = _blob_url(proxy, digest)
    part = client.get(url, headers={"Range": "bytes=1000-4999"})
    full = client.get(url)
    head = client.head(url)
    assert part.status_code == 206 and part.content == data[1000:5000]
    assert full.status_code == 200 and full.content == data
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    got = [(x.method, x.range, x.status, x.body_bytes, x.fault) for x in proxy.exchanges]
    assert got == [("GET", "bytes=1000-4999", 206, 4000, None),
                   ("GET", None, 200, len(data), None),
                   ("HEAD", None, 200, 0, None)]


def test_keep_alive_connections_stay_open_through_the_proxy(proxy, client, blob, registry):
    digest, data = blob
    for _ in range(5):
        assert client.get(_blob_url(proxy, digest)).content == data
    assert proxy.connections == 1
    assert len(proxy.exchanges) == 5


def test_uploads_pass_through_with_their_bodies(proxy, client):
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = client.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/")
    assert start.status_code == 202
    location = start.headers["location"]
    assert location.startswith(proxy.url)  # the registry builds it from our Host header

    def chunks():
        yield data[:50_000]
        yield data[50_000:]

    patched = client.patch(location, content=chunks())  # chunked request body
    assert patched.status_code == 202, patched.text
    done = client.put(_with_digest(patched.headers["location"], digest))
    assert done.status_code == 201, done.text
    assert client.get(_blob_url(proxy, digest)).content == data


def test_reset_fault_resets_matching_requests_then_clears(proxy, client, blob):
    digest, data = blob
    rule = proxy.inject(Fault.RESET, match=_is_blob_get, times=2)
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            client.get(_blob_url(proxy, digest))
    assert client.head(_blob_url(proxy, digest)).status_code == 200  # did not match
    assert client.get(_blob_url(proxy, digest)).content == data
    assert rule.hits == 2
    assert [x.fault for x in proxy.exchanges] == ["reset", "reset", None, None]
    assert proxy.exchanges[0].status is None


def test_per_connection_reset_hits_new_connections_only(proxy, blob):
    digest, data = blob
    proxy.inject(Fault.RESET, per="connection", times=1)
    with pytest.raises(httpx.TransportError):
        httpx.get(_blob_url(proxy, digest))
    assert httpx.get(_blob_url(proxy, digest)).content == data
    assert proxy.connections == 2
    assert len(proxy.exchanges) == 1  # the reset connection never got to a request


def test_503_and_429_answers_carry_their_status_and_retry_after(proxy, client, blob):
    digest, data = blob
    proxy.inject(Fault.UNAVAILABLE, match=_is_blob_get, times=1)
    proxy.inject(Fault.too_many(retry_after=3), match=_is_blob_get, times=1)
    first = client.get(_blob_url(proxy, digest))
    second = client.get(_blob_url(proxy, digest))
    third = client.get(_blob_url(proxy, digest))
    assert first.status_code == 503
    assert second.status_code == 429 and second.headers["retry-after"] == "3"
    assert third.status_code == 200 and third.content == data
    assert proxy.connections == 1  # fault answers keep the connection alive


def test_stall_delays_the_answer_past_a_client_timeout(proxy, blob):
    digest, data = blob
    proxy.inject(Fault.stall(1.5), match=_is_blob_get, times=1)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as c:
        c.get(_blob_url(proxy, digest))
    proxy.inject(Fault.stall(0.2), match=_is_blob_get, times=1)
    with httpx.Client(timeout=10) as c:
        assert c.get(_blob_url(proxy, digest)).content == data
    assert Fault.STALL.seconds == 10


def test_truncated_body_is_cut_after_k_bytes(proxy, client, blob):
    digest, data = blob
    proxy.inject(Fault.truncate(10_000), match=_is_blob_get, times=1)
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream(
            "GET", _blob_url(proxy, digest)) as r:
        for part in r.iter_bytes():
            received += part
    assert bytes(received) == data[:10_000]
    assert proxy.exchanges[-1].body_bytes == 10_000
    assert client.get(_blob_url(proxy, digest)).content == data


def test_truncated_body_can_end_with_a_reset(proxy, client, blob):
    digest, data = blob
    proxy.inject(Fault.truncate(10_000, reset=True), match=_is_blob_get, times=1)
    received = bytearray()
    with pytest.raises(httpx.ReadError), client.stream("GET", _blob_url(proxy, digest)) as r:
        assert r.status_code == 200
        for part in r.iter_bytes():
            received += part
    assert data.startswith(bytes(received)) and len(received) <= 10_000
    assert client.get(_blob_url(proxy, digest)).content == data


def test_ignore_range_answers_200_with_the_whole_blob(proxy, client, blob):
    digest, data = blob
    proxy.inject(Fault.IGNORE_RANGE, match=_is_blob_get)
    r = client.get(_blob_url(proxy, digest), headers={"Range": "bytes=0-99"})
    assert r.status_code == 200 and r.content == data
    x = proxy.exchanges[-1]
    assert (x.range, x.status, x.body_bytes) == ("bytes=0-99", 200, len(data))


def test_flip_changes_exactly_one_body_byte(proxy, client, blob):
    digest, data = blob
    proxy.inject(Fault.FLIP, match=_is_blob_get, times=1)
    proxy.inject(Fault.flip(offset=7), match=_is_blob_get, times=1)
    for r, at in ((client.get(_blob_url(proxy, digest)), len(data) // 2),
                  (client.get(_blob_url(proxy, digest), headers={"Range": "bytes=0-15"}), 7)):
        assert r.status_code in (200, 206)
        original = data[: len(r.content)]
        diff = [i for i in range(len(original)) if r.content[i] != original[i]]
        assert diff == [at]
        assert r.content[at] == original[at] ^ 0xFF


def test_down_resets_every_connection_until_up(proxy, blob):
    digest, data = blob
    with httpx.Client(transport=httpx.HTTPTransport(retries=0)) as c:
        assert c.get(_blob_url(proxy, digest)).content == data  # a kept-alive connection
        proxy.inject(Fault.DOWN)
        for _ in range(3):
            with pytest.raises(httpx.TransportError):
                c.get(_blob_url(proxy, digest))
        proxy.clear()
        assert c.get(_blob_url(proxy, digest)).content == data
    proxy.down()
    with pytest.raises(httpx.TransportError):
        httpx.get(_blob_url(proxy, digest))
    proxy.up()
    assert httpx.get(_blob_url(proxy, digest)).content == data


def test_closing_the_proxy_ends_its_threads_even_mid_stall(registry, blob):
    digest, _ = blob
    before = {t.ident for t in threading.enumerate()}
    with FaultProxy(registry.host) as p:
        p.inject(Fault.STALL, match=_is_blob_get)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(_blob_url(p, digest), timeout=0.3)
    left = [t for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("faultproxy")]
    assert left == []
