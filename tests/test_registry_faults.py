"""A misbehaving network between the daemon and the real registry.

A fault proxy (tests/helpers/faultproxy.py) sits between a mounted daemon and
Debian's docker-registry and breaks blob Range requests on demand: resets,
503, 429 with Retry-After, a stall longer than the fetch timeout, a truncated
body (closed, or reset: both count as ``truncated``), a server that ignores
Range, flipped bytes, and the registry going down. Reads must return the
right bytes once the fault clears, EIO (never a wrong byte, never a hang)
while it does not, and the daemon keeps serving what it has cached.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rafs.oci import parse_image_ref
from tests.helpers.faultproxy import Fault, FaultProxy, Request
from tests.helpers.mounts import mounted, read_stats

pytestmark = [pytest.mark.fuse]

FILE = "usr/bin/python3.11"  # several MiB: a few chunks, more than one amplified request
SMALL = "etc/debian_version"
FETCH_TIMEOUT = 3.0


def _range_get(req: Request) -> bool:
    return req.method == "GET" and "/blobs/" in req.path and req.range is not None


@pytest.fixture
def proxy(registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def expected(rafs_python_ref, tmp_path_factory) -> dict[str, bytes]:
    """The files as a mount straight from the registry (no proxy) serves them."""
    work = tmp_path_factory.mktemp("reference")
    with mounted(rafs_python_ref, work / "mnt", work / "cache") as mnt:
        return {name: (mnt / name).read_bytes() for name in (FILE, SMALL)}


def _via(proxy: FaultProxy, ref: str) -> str:
    image = parse_image_ref(ref)
    return f"docker://{proxy.host}/{image.repository}:{image.tag}"


def _mount(proxy: FaultProxy, ref: str, tmp_path: Path, *extra: str):
    return mounted(_via(proxy, ref), tmp_path / "mnt", tmp_path / "cache",
                   extra_args=["--no-prefetch", "--fetch-timeout", str(FETCH_TIMEOUT), *extra])


FAULTS = {
    "reset": (Fault.RESET, "connection"),
    "503": (Fault.UNAVAILABLE, "5xx"),
    "429": (Fault.too_many(1), "429"),
    "stall": (Fault.stall(10), "timeout"),
    "truncated": (Fault.truncate(1000), "truncated"),
    "truncated-by-reset": (Fault.truncate(1000, reset=True), "truncated"),
}


@pytest.mark.parametrize("name", FAULTS)
def test_reads_are_right_once_a_fault_clears(name, proxy, rafs_python_ref, expected, tmp_path):
    fault, error_class = FAULTS[name]
    with _mount(proxy, rafs_python_ref, tmp_path) as mnt:
        rule = proxy.inject(fault, _range_get, times=2)
        assert (mnt / FILE).read_bytes() == expected[FILE]
        stats = read_stats(mnt)["stats"]
    assert rule.hits == 2
    assert stats["retries"] >= 2 and stats["errors"] == 0
    assert stats["error_classes"].get(error_class, 0) >= 1, stats["error_classes"]
    faulted = [x for x in proxy.exchanges if x.fault]
    assert len(faulted) == 2
    if name in ("503", "429"):
        assert {x.status for x in faulted} == {int(name)}


def test_a_server_that_ignores_range_still_gives_the_right_bytes(
    proxy, rafs_python_ref, expected, tmp_path
):
    with _mount(proxy, rafs_python_ref, tmp_path) as mnt:
        proxy.inject(Fault.IGNORE_RANGE, _range_get)
        assert (mnt / FILE).read_bytes() == expected[FILE]
        assert (mnt / SMALL).read_bytes() == expected[SMALL]
        stats = read_stats(mnt)["stats"]
    assert stats["range_ignored"] >= 1 and stats["errors"] == 0
    assert any(x.status == 200 and x.range for x in proxy.exchanges)


def test_flipped_bytes_are_eio_and_never_served(proxy, rafs_python_ref, expected, tmp_path):
    with _mount(proxy, rafs_python_ref, tmp_path, "--retries", "1",
                "--amplify-bytes", "0") as mnt:
        rule = proxy.inject(Fault.flip(), _range_get)  # every answer is corrupt
        with pytest.raises(OSError) as e:
            (mnt / SMALL).read_bytes()
        assert e.value.errno == errno.EIO
        stats = read_stats(mnt)["stats"]
        assert stats["digest_failures"] >= 2  # retried once, then EIO
        assert rule.hits >= 2
        proxy.clear()  # the corrupt bytes were not cached: the next read fetches again
        assert (mnt / SMALL).read_bytes() == expected[SMALL]


def test_one_flipped_answer_is_retried_and_the_read_succeeds(
    proxy, rafs_python_ref, expected, tmp_path
):
    with _mount(proxy, rafs_python_ref, tmp_path, "--amplify-bytes", "0") as mnt:
        proxy.inject(Fault.flip(), _range_get, times=1)
        assert (mnt / SMALL).read_bytes() == expected[SMALL]
        stats = read_stats(mnt)["stats"]
    assert stats["digest_failures"] == 1 and stats["errors"] == 0


def test_a_registry_down_past_the_retry_budget_gives_eio_and_cached_data_stays(
    proxy, rafs_python_ref, expected, tmp_path
):
    with _mount(proxy, rafs_python_ref, tmp_path, "--retries", "2") as mnt:
        assert (mnt / SMALL).read_bytes() == expected[SMALL]  # now cached
        proxy.down()
        started = time.monotonic()
        with pytest.raises(OSError) as e:
            (mnt / FILE).read_bytes()
        elapsed = time.monotonic() - started
        assert e.value.errno == errno.EIO
        # Not a hang: 3 attempts, each failing at once or within the fetch timeout,
        # with backoff between them (the exact figure is the benchmark's business).
        assert elapsed < 3 * (FETCH_TIMEOUT + 10)
        assert (mnt / SMALL).read_bytes() == expected[SMALL]
        stats = read_stats(mnt)["stats"]
        assert stats["errors"] >= 1 and stats["backend_errors"] >= 3
        proxy.up()
        assert (mnt / FILE).read_bytes() == expected[FILE]
