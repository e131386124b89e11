"""The health of a registry endpoint: its counters, and whether requests go to it.

``EndpointHealth`` is one endpoint's state (``rafs.hosts.Endpoint``), kept by
the registry client that uses it and shown by ``rafs stats`` (``endpoints``)
and the Prometheus metrics:

- ``up``: requests go to it, in the order of the configuration;
- ``down``: it failed as an endpoint (no connection, a 5xx, a stall, bytes
  that did not match their digest) and requests go to the next endpoint. After
  a backoff (``PROBE``: 1 s, doubling up to 30 s, with jitter) *one* request
  is let through as a probe; if it succeeds the endpoint is ``up`` again, if
  not the next probe waits longer. Other requests never wait for a probe.

An answer that is not the endpoint's fault (404, 401, other 4xx) counts as an
error of that request but says the endpoint is alive. One log line per state
change (down at WARNING, back up at INFO), never one per request; the state
is only tracked when the registry has more than one endpoint (with one, there
is nowhere else to go, and the retry policy speaks for itself).

Light on purpose (no HTTP library): ``fused.stats`` renders these objects.
Transitions take a lock: the blocking client may be used from several threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .retry import RetryPolicy

__all__ = ["PROBE", "EndpointHealth"]

log = logging.getLogger(__name__)

PROBE = RetryPolicy(retries=0, base=1.0, cap=30.0, jitter=0.2)  # delays between probes


class EndpointHealth:
    """Counters and up/down state of one endpoint (see the module docstring)."""

    def __init__(self, name: str, *, role: str = "mirror", track: bool = True,
                 policy: RetryPolicy = PROBE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.role = role  # "mirror" or "server"
        self.track = track
        self.policy = policy
        self.clock = clock
        self.up = True
        self.requests = 0
        self.errors = 0
        self.bytes = 0
        self.digest_errors = 0
        self.stalls = 0
        self.failures = 0  # consecutive endpoint failures
        self.retry_at = 0.0
        self.probing = False
        self.last_error = ""
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return "up" if self.up else "down"

    def usable(self) -> bool:
        """May a request go here now? A down endpoint whose backoff has passed takes
        this request as its probe (one at a time); the caller must report how it
        went (``succeeded``/``answered``/``failed``) or ``release`` the claim."""
        with self._lock:
            if self.up:
                return True
            if self.probing or self.clock() < self.retry_at:
                return False
            self.probing = True
            return True

    def release(self) -> None:
        """A probe claimed by ``usable`` ended without a verdict (cancelled)."""
        with self._lock:
            self.probing = False

    def succeeded(self) -> None:
        """A request here succeeded."""
        self._alive()

    def answered(self) -> None:
        """A request here failed, but by an answer: the endpoint itself is alive."""
        with self._lock:
            self.errors += 1
        self._alive()

    def _alive(self) -> None:
        with self._lock:
            self.probing = False
            self.failures = 0
            if self.up:
                return
            self.up = True
        log.info("%s %s is back up", self.role, self.name)

    def failed(self, reason: str, *, digest: bool = False, stall: bool = False) -> None:
        """The endpoint failed as an endpoint (unreachable, 5xx, stalled, wrong bytes)."""
        with self._lock:
            self.errors += 1
            self.digest_errors += digest
            self.stalls += stall
            self.last_error = reason
            self.probing = False
            if not self.track:
                return
            self.failures += 1
            delay = self.policy.delay(self.failures)
            self.retry_at = self.clock() + delay
            was_up, self.up = self.up, False
        if was_up:
            log.warning("%s %s is down (%s); using the next endpoint, trying it again in "
                        "%.1fs", self.role, self.name, reason, delay)
        else:
            log.debug("%s %s is still down (%s); next probe in %.1fs", self.role, self.name,
                      reason, delay)

    def snapshot(self) -> dict[str, object]:
        return {"role": self.role, "state": self.state, "requests": self.requests,
                "errors": self.errors, "bytes": self.bytes,
                "digest_errors": self.digest_errors, "stalls": self.stalls,
                "last_error": self.last_error}
