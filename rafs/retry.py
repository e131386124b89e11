"""The one retry policy: how often, and after how long, a failed request is tried again.

``RetryPolicy`` is a frozen value: ``retries`` (tries after the first),
``base`` and ``cap`` of the exponential backoff, ``jitter`` (the fraction of
each delay that is random, so that clients failing together do not retry
together) and ``retry_after_cap`` (the longest ``Retry-After`` a server may
impose). The formula, for the n-th retry (n = 1, 2, ...)::

    delay = min(cap, base * 2**(n-1)) * uniform(1 - jitter, 1)
    delay = max(delay, min(retry_after, retry_after_cap))   if the server sent one

``policy.start(logger)`` gives a ``Backoff`` for one operation: each failure
is handed to ``backoff.next(error)``, which returns the delay to sleep before
the next attempt (logged at INFO on the first retry and at WARNING after
that) or None when the retries are spent. Sleeping is the caller's, so sync
and async callers share it: ``time.sleep`` in the converter's registry client,
``trio.sleep`` in the daemon's fetcher; ``rafs.registry`` flows yield the
delay to whichever driver runs them.

Used by: ``rafs.registry`` (every request of both clients, the resumable blob
stream), ``fused.fetcher`` (range fetches and single-chunk refetches) and so
``fused.daemon`` (the bootstrap, read through the backend's client).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_RETRIES", "RETRY_RECORD", "Backoff", "RetryPolicy"]

log = logging.getLogger(__name__)

#: The attribute that marks the log record of a retry (``extra=``), for handlers that
#: show outcomes only (the CLI at its default verbosity).
RETRY_RECORD = "rafs_retry"

DEFAULT_RETRIES = 4


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many retries, and the backoff between them (see the module docstring)."""

    retries: int = DEFAULT_RETRIES
    base: float = 0.2
    cap: float = 10.0
    jitter: float = 0.5
    retry_after_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base < 0 or self.cap < 0 or self.retry_after_cap < 0:
            raise ValueError("retry counts and delays cannot be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")

    @property
    def attempts(self) -> int:
        """Tries in all: the first one and its retries."""
        return self.retries + 1

    def delay(self, retry: int, retry_after: float | None = None,
              uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        delay = min(self.cap, self.base * 2 ** max(retry - 1, 0))
        delay *= uniform(1.0 - self.jitter, 1.0)
        if retry_after is not None:
            delay = max(delay, min(max(retry_after, 0.0), self.retry_after_cap))
        return delay

    def level(self, retry: int) -> int:
        """The log level of retry number ``retry``: one retry is news, more are a warning."""
        return logging.INFO if retry <= 1 else logging.WARNING

    def longest_wait(self, per_attempt: float) -> float:
        """The most an operation can take under this policy when each attempt takes at
        most ``per_attempt`` seconds (every server asking for the longest Retry-After)."""
        sleeps = sum(max(min(self.cap, self.base * 2 ** (n - 1)), self.retry_after_cap)
                     for n in range(1, self.retries + 1))
        return self.attempts * per_attempt + sleeps

    def start(self, logger: logging.Logger | None = None) -> Backoff:
        """The retry state of one operation, logging to ``logger``."""
        return Backoff(self, logger or log)


class Backoff:
    """One operation's retries under a ``RetryPolicy``."""

    __slots__ = ("logger", "policy", "retry")

    def __init__(self, policy: RetryPolicy, logger: logging.Logger) -> None:
        self.policy = policy
        self.logger = logger
        self.retry = 0  # retries granted so far

    @property
    def attempts(self) -> int:
        """Attempts made so far, counting the one that just failed."""
        return self.retry + 1

    def next(self, error: BaseException, context: str = "") -> float | None:
        """The delay before the next attempt after ``error`` (logged), or None when the
        retries are spent. ``context`` prefixes the log line when the error's own
        message does not say what failed."""
        if self.retry >= self.policy.retries:
            return None
        self.retry += 1
        delay = self.policy.delay(self.retry, getattr(error, "retry_after", None))
        self.logger.log(self.policy.level(self.retry), "%s%s; retry %d of %d in %.2fs",
                        f"{context}: " if context else "", str(error) or type(error).__name__,
                        self.retry, self.policy.retries, delay,
                        extra={RETRY_RECORD: self.retry})
        return delay

    def reset(self) -> None:
        """Progress was made: the next failure starts the count again."""
        self.retry = 0
