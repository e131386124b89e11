"""The link emulator gives the rate and latency it promises (within 10 % on loopback)
and counts exactly what crosses it.

These tests measure the emulator itself, so timing is their point; they are kept
short (a few seconds in all) and measure over enough data (~2 MB at 20 Mbit/s)
that a busy machine does not matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.linkemu import PROFILES, LinkEmulator, LinkProfile

RATE_BPS = 20e6  # 20 Mbit/s = 2.5 MB/s
RATE = LinkProfile("test-rate", RATE_BPS, 0.0)
LATENCY = LinkProfile("test-latency", None, 0.100)


class Upstream:
    """A TCP server speaking a line protocol: ``SEND n`` -> n bytes back;
    ``RECV n`` + n bytes -> ``OK <seconds from first to last byte>``; ``PING`` -> ``PONG``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []

    def __enter__(self) -> Upstream:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for c in list(self.conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in list(self.threads):
            t.join(5)
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while line := f.readline():
                cmd, _, arg = line.decode().strip().partition(" ")
                if cmd == "PING":
                    conn.sendall(b"PONG\n")
                elif cmd == "SEND":
                    n = int(arg)
                    block = os.urandom(64 * 1024)
                    while n > 0:
                        conn.sendall(block[:n])
                        n -= len(block)
                elif cmd == "RECV":
                    n, first, last = int(arg), None, None
                    while n > 0:
                        data = f.read1(min(n, 65536))
                        if not data:
                            return
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        n -= len(data)
                    conn.sendall(f"OK {last - first:.6f}\n".encode())


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


def _connect(emu: LinkEmulator) -> socket.socket:
    host, port = emu.host.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=20)


def _download(emu: LinkEmulator, nbytes: int, out: list[tuple[float, float, int]]) -> None:
    """Fetch ``nbytes``; append (first byte time, last byte time, bytes after the first read)."""
    with _connect(emu) as s:
        s.sendall(f"SEND {nbytes}\n".encode())
        got, first, first_len, last = 0, 0.0, 0, 0.0
        while got < nbytes:
            data = s.recv(65536)
            assert data, "connection closed early"
            now = time.perf_counter()
            if not got:
                first, first_len = now, len(data)
            got += len(data)
            last = now
        out.append((first, last, got - first_len))


def _within(measured: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(measured - expected) <= tolerance * expected


def test_download_rate_is_the_cap(upstream):
    with LinkEmulator(upstream.host, RATE) as emu:
        out: list[tuple[float, float, int]] = []
        _download(emu, 2_000_000, out)
    first, last, after_first = out[0]
    rate_bps = after_first * 8 / (last - first)
    assert _within(rate_bps, RATE_BPS), f"{rate_bps / 1e6:.2f} Mbit/s"


def test_upload_rate_is_the_cap(upstream):
    n = 2_000_000
    with LinkEmulator(upstream.host, RATE) as emu, _connect(emu) as s:
        s.sendall(f"RECV {n}\n".encode())
        s.sendall(os.urandom(n))
        reply = s.makefile("rb").readline().decode().split()
    seconds = float(reply[1])
    # the server times first to last byte: everything but the first chunk (16 KiB)
    # and the saved burst travelled at the link rate
    rate_bps = (n - 48 * 1024) * 8 / seconds
    assert _within(rate_bps, RATE_BPS), f"{rate_bps / 1e6:.2f} Mbit/s"


def test_connections_share_one_cap(upstream):
    with LinkEmulator(upstream.host, RATE) as emu:
        out: list[tuple[float, float, int]] = []
        threads = [threading.Thread(target=_download, args=(emu, 1_000_000, out))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(out) == 2
    first = min(o[0] for o in out)
    last = max(o[1] for o in out)
    rate_bps = sum(o[2] for o in out) * 8 / (last - first)
    assert _within(rate_bps, RATE_BPS), f"{rate_bps / 1e6:.2f} Mbit/s"
    # and fairly: both finish close to the end, neither waits for the other
    assert abs(out[0][1] - out[1][1]) < 0.25 * (last - first)


def test_round_trip_is_the_profile_rtt(upstream):
    with LinkEmulator(upstream.host, LATENCY) as emu, _connect(emu) as s:
        f = s.makefile("rb")
        start = time.perf_counter()
        s.sendall(b"PING\n")
        assert f.readline() == b"PONG\n"
        first_exchange = time.perf_counter() - start
        rtts = []
        for _ in range(8):
            start = time.perf_counter()
            s.sendall(b"PING\n")
            assert f.readline() == b"PONG\n"
            rtts.append(time.perf_counter() - start)
    # scheduling on a busy machine only ever adds delay: the fastest round trip is
    # the emulator's own
    rtt = min(rtts)
    assert _within(rtt, LATENCY.rtt), f"rtt {rtt * 1000:.1f} ms, all {rtts}"
    # a new connection pays one more round trip (its handshake)
    assert first_exchange >= 1.9 * LATENCY.rtt, f"first {first_exchange * 1000:.1f} ms"


def test_a_transfer_takes_the_round_trip_plus_its_size_at_the_link_rate(upstream):
    # 100 ms one way each, 2.5 MB/s: the first byte is back after 200 ms, the
    # last 200 ms (500 kB at the link rate) later
    profile = LinkProfile("test-both", RATE_BPS, 0.200)
    firsts, lasts = [], []
    with LinkEmulator(upstream.host, profile, handshake=False) as emu:
        for _ in range(3):  # a busy machine only adds delay: the fastest run counts
            out: list[tuple[float, float, int]] = []
            start = time.perf_counter()
            _download(emu, 500_000, out)
            firsts.append(out[0][0] - start)
            lasts.append(out[0][1] - start)
    assert min(firsts) >= 0.9 * profile.rtt, f"first bytes after {firsts}"
    expected = profile.rtt + profile.seconds_for(500_000)
    assert _within(min(lasts), expected), f"last bytes after {lasts}"


def test_counters_are_exact(upstream):
    sizes = (1, 1000, 123_457)
    sent_up = received_down = 0
    with LinkEmulator(upstream.host, LinkProfile("test-count", 200e6, 0.002)) as emu:
        for n in sizes:
            with _connect(emu) as s, s.makefile("rb") as f:
                request = f"SEND {n}\n".encode()
                s.sendall(request)
                received_down += len(f.read(n))
                upload = f"RECV {n}\n".encode() + b"x" * n
                s.sendall(upload)
                reply = f.readline()
                assert reply.startswith(b"OK ")
                sent_up += len(request) + len(upload)
                received_down += len(reply)
        c = emu.wait_idle()
    assert (c.bytes_up, c.bytes_down) == (sent_up, received_down)
    assert (c.connections, c.active) == (len(sizes), 0)


def test_local_profile_passes_bytes_unshaped_and_counts_them(upstream):
    with LinkEmulator(upstream.host, "local") as emu:
        out: list[tuple[float, float, int]] = []
        _download(emu, 3_000_000, out)
        c = emu.wait_idle()
    assert (c.bytes_down, c.bytes_up, c.connections) == (3_000_000, len(b"SEND 3000000\n"), 1)


def test_profiles_are_the_issue_figures():
    assert (PROFILES["wan"].rate_bps, PROFILES["wan"].rtt) == (100e6, 0.020)
    assert (PROFILES["lan"].rate_bps, PROFILES["lan"].rtt) == (1e9, 0.002)
    assert (PROFILES["local"].rate_bps, PROFILES["local"].rtt) == (None, 0.0)


def test_stop_leaves_no_thread_behind(upstream):
    before = {t.ident for t in threading.enumerate()}
    with LinkEmulator(upstream.host, "wan") as emu, _connect(emu) as s:
        s.sendall(b"PING\n")  # a connection still open when the emulator stops
        s.makefile("rb").readline()
    left = [t for t in threading.enumerate() if t.ident not in before and t.name == "linkemu"]
    assert left == []


def test_cli_prints_its_address_and_counters(upstream):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.linkemu", "--profile", "lan", "--listen", "127.0.0.1:0",
         "--upstream", upstream.host],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["profile"] == "lan" and info["rate_bps"] == 1e9
        host, port = info["listen"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"PING\n")
            assert s.makefile("rb").readline() == b"PONG\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    counters = json.loads(err.strip().splitlines()[-1])
    assert counters["bytes_up"] == len(b"PING\n") and counters["bytes_down"] == len(b"PONG\n")
    assert counters["connections"] == 1


def test_registry_traffic_through_the_wan_profile_is_counted(registry):
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(f"{registry.url}/v2/linkemu/selftest/blobs/uploads/")
    location = start.headers["location"]
    put = httpx.put(location + ("&" if "?" in location else "?") + "digest=" + digest,
                    content=data)
    assert put.status_code == 201, put.text
    with LinkEmulator(registry.host, profile="wan") as link:
        registry.mark()
        with httpx.Client() as client:
            for _ in range(3):
                r = client.get(f"http://{link.address}/v2/linkemu/selftest/blobs/{digest}")
                assert r.content == data
        c = link.wait_idle()
    served = sum(x.bytes for x in registry.blob_gets())
    assert served == 3 * len(data)
    assert c.connections == 1  # keep-alive through the link
    assert served < c.bytes_down < served + 3 * 1024  # body plus response heads
