"""Rate limiting: in-process token buckets, answered with 429 and Retry-After.

Two budgets, both charged before any byte of the request body is read:

- **per address**: every request from a remote address, on every path (API, pages, images,
  static files), takes a token from that address's bucket (`PHATGOOSE_RATE_LIMIT_ADDRESS_*`).
  It is charged first, before the bearer token is even looked up, so a flood of forged
  tokens costs the flooder's own budget and not a database query each beyond it.
- **per client**: a request whose bearer token was *verified* (`coordinator.core.edge`) takes
  a token from that token's bucket; any other request (no token, or one that failed) from
  its address's anonymous bucket (`PHATGOOSE_RATE_LIMIT_PER_MINUTE`, `..._BURST`). A token's
  public id alone never selects a bucket: it is printed in listings and is part of every
  token, so keying on it unverified let forged ids dodge the address limit and let anyone
  drain a victim's bucket.

A bucket holds at most `burst` tokens and refills at `per_minute / 60` tokens a second. An
empty bucket is a 429 with `Retry-After` (whole seconds until a token is back) and the usual
error body. The limiter lives in one process: several API processes each keep their own
buckets. The number of buckets kept is bounded (the least recently used are forgotten).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Scope, Send


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until one token is back (0 when allowed)
    remaining: int


class TokenBucketLimiter:
    """Buckets keyed by client; thread-safe; `clock` is injectable for tests."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("per_minute > 0, burst >= 1 and max_clients >= 1 are required")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0) -> Decision:
        now = self.clock()
        with self._lock:
            tokens, updated = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        retry_after = 0.0 if allowed else (cost - tokens) / self.rate
        return Decision(allowed, retry_after, int(tokens))

    def __len__(self) -> int:
        return len(self._buckets)


def remote_address(scope: Scope) -> str:
    """The peer's address as the server saw it (forwarded headers are not trusted)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


@dataclass(frozen=True)
class RateLimits:
    """The two budgets a request is charged against."""

    per_address: TokenBucketLimiter
    per_client: TokenBucketLimiter

    def charge_address(self, scope: Scope) -> tuple[TokenBucketLimiter, Decision]:
        return self.per_address, self.per_address.take("addr:" + remote_address(scope))

    def charge_client(
        self, scope: Scope, verified_public_id: str | None
    ) -> tuple[TokenBucketLimiter, Decision]:
        if verified_public_id is not None:
            key = "token:" + verified_public_id
        else:
            key = "anon:" + remote_address(scope)
        return self.per_client, self.per_client.take(key)


async def send_too_many_requests(
    send: Send, limiter: TokenBucketLimiter, decision: Decision, who: str
) -> None:
    """The 429 answer, in the coordinator's error shape."""
    retry_after = max(1, math.ceil(decision.retry_after))
    body = json.dumps(
        {
            "detail": {
                "error": "rate_limited",
                "check": "rate_limit",
                "file": None,
                "tensor": None,
                "expected": f"at most {limiter.rate * 60:g} requests a minute "
                f"(bursts of {limiter.burst:g}) from {who}",
                "message": f"too many requests from {who}; retry after {retry_after} s",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
