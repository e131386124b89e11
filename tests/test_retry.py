"""The one retry policy: its delays, its Retry-After handling, its budget and its log levels."""

from __future__ import annotations

import logging

import pytest

from rafs.errors import TransientError
from rafs.retry import RetryPolicy


def test_delays_double_up_to_the_cap_without_jitter():
    policy = RetryPolicy(base=0.5, cap=3.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_takes_a_random_share_off_each_delay():
    policy = RetryPolicy(base=1.0, cap=100.0, jitter=0.5)
    delays = [policy.delay(3) for _ in range(500)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 400  # not all the same: clients do not retry in lockstep
    assert policy.delay(3, uniform=lambda lo, hi: lo) == 2.0
    assert policy.delay(3, uniform=lambda lo, hi: hi) == 4.0


def test_retry_after_lengthens_a_delay_up_to_its_cap_and_never_shortens_one():
    policy = RetryPolicy(base=1.0, cap=8.0, jitter=0.0, retry_after_cap=20.0)
    assert policy.delay(1, retry_after=5.0) == 5.0
    assert policy.delay(1, retry_after=3600.0) == 20.0
    assert policy.delay(4, retry_after=0.0) == 8.0
    assert policy.delay(1, retry_after=-3.0) == 1.0


def test_a_backoff_grants_the_retries_then_stops_and_progress_restarts_it(caplog):
    policy = RetryPolicy(retries=2, base=0.01, jitter=0.0)
    backoff = policy.start(logging.getLogger("test.retry"))
    error = TransientError("blob x: reset", error_class="connection")
    with caplog.at_level(logging.INFO, logger="test.retry"):
        assert backoff.next(error) == 0.01
        assert backoff.next(error, "context") == 0.02
        assert backoff.next(error) is None
    assert backoff.attempts == 3 == policy.attempts
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
    assert caplog.records[0].getMessage() == "blob x: reset; retry 1 of 2 in 0.01s"
    assert caplog.records[1].getMessage() == "context: blob x: reset; retry 2 of 2 in 0.02s"
    backoff.reset()
    assert backoff.next(error) == 0.01


def test_a_server_retry_after_reaches_the_backoff():
    backoff = RetryPolicy(base=0.01, jitter=0.0).start()
    assert backoff.next(TransientError("429", error_class="429", retry_after=2.5)) == 2.5


def test_an_error_without_a_message_is_named_in_the_log(caplog):
    class Silent(Exception):
        pass

    with caplog.at_level(logging.INFO, logger="rafs.retry"):
        RetryPolicy().start().next(Silent())
    assert caplog.records[0].getMessage().startswith("Silent; retry 1 of 4")


def test_the_longest_wait_bounds_every_sleep_and_attempt():
    policy = RetryPolicy(retries=3, base=1.0, cap=4.0, retry_after_cap=2.0)
    # attempts of 5 s each; sleeps: max(1, 2) + max(2, 2) + max(4, 2)
    assert policy.longest_wait(5.0) == 4 * 5.0 + 2 + 2 + 4
    worst = sum(policy.delay(n, retry_after=1e9, uniform=lambda lo, hi: hi)
                for n in range(1, 4))
    assert worst <= policy.longest_wait(0.0)


@pytest.mark.parametrize("bad", [{"retries": -1}, {"base": -1.0}, {"jitter": 1.5}])
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)
