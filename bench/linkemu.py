"""Link emulator: a trio TCP proxy that gives loopback traffic a bandwidth and a latency.

Owns: ``LinkProfile`` and the named ``PROFILES`` (``wan``: 100 Mbit/s, 20 ms
RTT; ``lan``: 1 Gbit/s, 2 ms RTT; ``local``: no shaping), ``LinkEmulator``
(the proxy, run in a background thread by a context manager) and the CLI
``python -m bench.linkemu --profile wan --listen 127.0.0.1:0 --upstream HOST:PORT``.

The kernel here has no netem, so the link is modelled in user space, per
direction (client -> upstream is "up", upstream -> client is "down"):

- **bandwidth**: one token bucket per direction, shared by every connection.
  A chunk of data reserves its transmission slot on the bucket's clock (slots
  are handed out in arrival order, so connections share the link fairly);
  ``burst`` bytes may go ahead of the clock.
- **latency**: each chunk joins a timed queue when its transmission ends and
  leaves it ``rtt / 2`` later, so all of the data is delayed, not only the first
  byte, and data in flight is bounded by the bandwidth-delay product.
- **handshake**: a new connection costs one RTT before its first byte travels
  (the client's TCP handshake to the proxy is local and instant).
- **counters**: bytes delivered per direction and connections accepted, exact
  (``LinkCounters``); a byte is counted once it was handed to the receiving
  socket, so the figures are final when no connection is open (``wait_idle``).

Nothing here measures or asserts; ``tests/test_linkemu.py`` measures the emulator.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import signal
import sys
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType

import trio

__all__ = ["PROFILES", "LinkCounters", "LinkEmulator", "LinkProfile", "TokenBucket", "main"]

log = logging.getLogger(__name__)

CHUNK = 16 * 1024  # bytes read at a time on a shaped link
LOCAL_CHUNK = 256 * 1024


@dataclass(frozen=True)
class LinkProfile:
    """A link: ``rate_bps`` bits per second per direction (None: unlimited) and a
    round-trip time in seconds (half of it is added to each direction)."""

    name: str
    rate_bps: float | None
    rtt: float
    burst: int = 32 * 1024  # bytes that may go ahead of the bucket's clock

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    @property
    def rate_bytes(self) -> float | None:
        return None if self.rate_bps is None else self.rate_bps / 8

    @property
    def shaped(self) -> bool:
        return self.rate_bps is not None or self.rtt > 0

    def seconds_for(self, nbytes: int) -> float:
        """Time to carry ``nbytes`` at this link's rate (0 when unlimited)."""
        rate = self.rate_bytes
        return 0.0 if rate is None else nbytes / rate


PROFILES: dict[str, LinkProfile] = {
    "wan": LinkProfile("wan", 100e6, 0.020),
    "lan": LinkProfile("lan", 1e9, 0.002),
    "local": LinkProfile("local", None, 0.0),
}


@dataclass(frozen=True)
class LinkCounters:
    """What crossed the link: bytes delivered each way, connections accepted and open."""

    bytes_up: int
    bytes_down: int
    connections: int
    active: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


class TokenBucket:
    """A token bucket on trio's clock: ``rate`` bytes/s, at most ``burst`` bytes saved.

    ``reserve(n)`` books the next ``n`` bytes of link time and returns when they
    may start; callers are served in the order they call it.

    ``continuing``: the caller's data was already waiting when it last reserved
    (the sender is ahead of the link). Then time the emulator itself lost (its
    thread not scheduled, on a busy machine) is made up, up to ``catch_up``
    seconds, instead of being lost from the link: a real link would have kept
    sending. A transfer that starts after idle time gets only ``burst``.
    """

    def __init__(self, rate: float, burst: int, catch_up: float = 0.5) -> None:
        self.rate = rate
        self.burst = burst
        self.catch_up = catch_up
        self._clock = -math.inf  # when the link is next free, minus saved tokens

    async def reserve(self, nbytes: int, *, continuing: bool = False) -> float:
        """Wait until ``nbytes`` may be sent; return when their transmission ends."""
        now = trio.current_time()
        slack = max(self.catch_up, self.burst / self.rate) if continuing else (
            self.burst / self.rate)
        start = max(self._clock, now - slack)
        end = self._clock = start + nbytes / self.rate
        if start > now:
            await trio.sleep_until(start)
        return max(end, now)


class _Direction:
    def __init__(self, profile: LinkProfile) -> None:
        rate = profile.rate_bytes
        self.bucket = TokenBucket(rate, profile.burst) if rate is not None else None
        self.delay = profile.one_way
        self.bytes = 0


class LinkEmulator:
    """The emulated link in front of ``upstream`` (``HOST:PORT``).

    Use as a context manager: it runs trio in a background thread and stops it on
    exit. ``address`` (``HOST:PORT``, also ``host``) is where clients connect
    (``listen`` may use port 0).
    """

    def __init__(self, upstream: str, profile: LinkProfile | str = "local", *,
                 listen: str = "127.0.0.1:0", handshake: bool = True) -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.upstream = _split_hostport(upstream)
        self.listen = _split_hostport(listen)
        self.handshake = handshake
        self._up = _Direction(self.profile)
        self._down = _Direction(self.profile)
        self._connections = 0
        self._active = 0
        self.sockaddr: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    # -- addresses and counters ----------------------------------------------

    @property
    def address(self) -> str:
        """``HOST:PORT`` clients connect to (e.g. as the registry host)."""
        if self.sockaddr is None:
            raise RuntimeError("link emulator not started")
        return f"{self.sockaddr[0]}:{self.sockaddr[1]}"

    @property
    def host(self) -> str:
        """Same as ``address`` (the name ``RegistryServer`` and ``FaultProxy`` use)."""
        return self.address

    def counters(self) -> LinkCounters:
        return LinkCounters(self._up.bytes, self._down.bytes, self._connections, self._active)

    def wait_idle(self, timeout: float = 10.0) -> LinkCounters:
        """Wait until no connection is open (the counters are final then); return them."""
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.counters()

    def reset_counters(self) -> None:
        self._up.bytes = self._down.bytes = 0
        self._connections = 0

    # -- lifecycle in a thread -------------------------------------------------

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run_thread, name="linkemu", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"link emulator did not start: {self._error!r}")

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        thread.join(10)

    def _run_thread(self) -> None:
        try:
            trio.run(self.serve)
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()

    # -- the proxy -------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve until cancelled (usable directly inside a trio program)."""
        host, port = self.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        self.sockaddr = (sockname[0], sockname[1])
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self._ready.set()
            task_status.started(self.sockaddr)
            log.info("link %s: %s -> %s:%d", self.profile.name, self.host, *self.upstream)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        self._connections += 1
        self._active += 1
        accepted = trio.current_time()
        try:
            try:
                upstream = await trio.open_tcp_stream(*self.upstream)
            except OSError as e:
                log.warning("link: cannot reach upstream %s:%d: %s", *self.upstream, e)
                await client.aclose()
                return
            async with client, upstream:
                not_before = accepted + self.profile.rtt if self.handshake else accepted
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, self._up, not_before)
                    nursery.start_soon(self._pump, upstream, client, self._down, accepted)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("link connection closed: %s", e)
        finally:
            self._active -= 1

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, way: _Direction,
                    not_before: float) -> None:
        if not self.profile.shaped:
            while data := await src.receive_some(LOCAL_CHUNK):
                await dst.send_all(data)
                way.bytes += len(data)
        else:
            # bounded: data in flight is about the bandwidth-delay product
            send, receive = trio.open_memory_channel[tuple[float, bytes]](256)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._transmit, src, send, way, not_before)
                nursery.start_soon(self._deliver, dst, receive, way)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await dst.send_eof()

    async def _transmit(self, src: trio.SocketStream,
                        send: trio.MemorySendChannel[tuple[float, bytes]],
                        way: _Direction, not_before: float) -> None:
        async with send:
            await trio.sleep_until(not_before)
            continuing = False
            while data := await src.receive_some(CHUNK):
                if way.bucket is not None:
                    done = await way.bucket.reserve(len(data), continuing=continuing)
                    # more bytes already waiting in the kernel: the sender is ahead of
                    # the link, so time this task loses before its next turn is lag
                    continuing = _queued(src) > 0
                else:
                    done = trio.current_time()
                await send.send((done + way.delay, data))

    async def _deliver(self, dst: trio.SocketStream,
                       receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
                       way: _Direction) -> None:
        async with receive:
            async for arrive, data in receive:
                await trio.sleep_until(arrive)
                await dst.send_all(data)
                way.bytes += len(data)


def _queued(stream: trio.SocketStream) -> int:
    """Bytes received by the kernel and not yet read from ``stream``."""
    try:
        buf = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _profile_from_args(args: argparse.Namespace) -> LinkProfile:
    base = PROFILES[args.profile]
    rate = base.rate_bps if args.rate_mbit is None else args.rate_mbit * 1e6
    rtt = base.rtt if args.rtt_ms is None else args.rtt_ms / 1000
    if rate is not None and rate <= 0:
        rate = None
    return LinkProfile(base.name, rate, rtt, base.burst)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.linkemu",
        description="Emulate a network link (bandwidth, latency) in front of a TCP server.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="wan")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    parser.add_argument("--rate-mbit", type=float, help="override the profile's rate (0: none)")
    parser.add_argument("--rtt-ms", type=float, help="override the profile's round-trip time")
    parser.add_argument("--no-handshake", action="store_true",
                        help="do not charge new connections one RTT")
    args = parser.parse_args(argv)
    try:
        emu = LinkEmulator(args.upstream, _profile_from_args(args), listen=args.listen,
                           handshake=not args.no_handshake)
    except ValueError as e:
        print(f"linkemu: error: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(emu.serve)
            p = emu.profile
            print(json.dumps({"listen": f"{address[0]}:{address[1]}", "profile": p.name,
                              "rate_bps": p.rate_bps, "rtt": p.rtt}), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except OSError as e:
        print(f"linkemu: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(emu.counters())), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
