"""The per-key rate limiter: the bucket arithmetic, and a table that does not grow forever."""

from octomil.server.limits import Rate, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_bursts_its_count_then_waits_for_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(2, 10.0), clock)
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == 5.0  # one request refills in 10 s / 2
    clock.now = 5.0
    assert limiter.acquire("a") == 0.0


def test_buckets_of_keys_gone_quiet_are_dropped() -> None:
    """Regression: one bucket per client address was kept forever (memory grew with clients)."""
    clock = Clock()
    limiter = RateLimiter(Rate(2, 8.0), clock)  # refills 0.25 per second
    for n in range(1000):
        limiter.acquire(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 1000
    clock.now = 4.0
    limiter.acquire("busy")
    limiter.acquire("busy")
    clock.now = 8.0  # a period on: the others have refilled, "busy" has 1 of 2
    assert limiter.acquire("late") == 0.0
    assert len(limiter) == 2  # "busy" and "late"
    clock.now = 10.0
    assert limiter.acquire("busy") == 0.0  # its state was kept: 1.5 tokens, one taken
    assert limiter.acquire("busy") == 2.0
