"""Per-key limits: a request rate (token bucket) and a number of generations in flight.

Both answer "may this key start one more request now?" and, when not, how many seconds to wait
(the ``Retry-After`` of the 429). The rate bucket holds ``count`` requests and refills ``count``
per ``period`` seconds, so a key may burst ``count`` requests and then sustain the rate.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from octomil.config import ConfigError

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"60/min"``, ``"5/10s"``, ``"1000/h"``."""
        m = _RATE.match(text.lower())
        if not m or m.group(3) not in _UNITS:
            raise ConfigError(f"--rate-limit must look like 60/min, 5/10s or 1000/h, got {text!r}")
        count, scale = int(m.group(1)), float(m.group(2) or 1)
        if count < 1 or scale <= 0:
            raise ConfigError(f"--rate-limit needs a positive count and period, got {text!r}")
        return cls(count, scale * _UNITS[m.group(3)])

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


class RateLimiter:
    """One token bucket per key; thread-safe (called from the event loop only, but cheap).

    Without API keys a key is a client address, so keys come and go: once a period, buckets
    that have refilled to capacity are dropped (a full bucket is what a new key gets anyway),
    which keeps the table to the keys seen within about one period.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()
        self._clock = clock
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one request from ``key``'s bucket: 0.0 when allowed, else seconds to wait."""
        capacity, per_s = self.rate.count, self.rate.count / self.rate.period_s
        now = self._clock()
        with self._lock:
            if now - self._swept >= self.rate.period_s:
                self._swept = now
                self._buckets = {
                    k: (t, last)
                    for k, (t, last) in self._buckets.items()
                    if t + (now - last) * per_s < capacity
                }
            tokens, last = self._buckets.get(key, (float(capacity), now))
            tokens = min(capacity, tokens + (now - last) * per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / per_s


class InFlight:
    """Generations running per key, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}

    def enter(self, key: str) -> bool:
        n = self._running.get(key, 0)
        if n >= self.limit:
            return False
        self._running[key] = n + 1
        return True

    def leave(self, key: str) -> None:
        n = self._running.get(key, 0) - 1
        if n > 0:
            self._running[key] = n
        else:
            self._running.pop(key, None)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
