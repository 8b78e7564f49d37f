"""Rate limiting: an in-process token bucket per client, answered with 429 and Retry-After.

A client is its bearer token's public id when the request carries a well-formed token, else
its remote address. Every request under the limited prefix takes one token from the
client's bucket; the bucket holds at most `burst` tokens and refills at `per_minute / 60`
tokens a second. An empty bucket is a 429 with `Retry-After` (whole seconds until a token
is back) and the usual error body, sent before any byte of the request body is read.

The limiter lives in one process: several API processes each keep their own buckets, so the
effective limit is multiplied by their number. The number of buckets kept is bounded (the
least recently used are forgotten), so forged token ids cannot grow memory without bound.
Settings: `PHATGOOSE_RATE_LIMIT_*` (`coordinator.core.config.Settings`).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

# The public id of `<prefix>_<public id>_<secret>` (coordinator.auth.service).
_BEARER = re.compile(rb"^bearer\s+[a-z]{1,8}_([0-9a-f]{16})_[\w-]{20,200}\s*$", re.IGNORECASE)


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


def client_key(scope: Scope) -> str:
    """`token:<public id>` for a well-formed bearer token, else `addr:<remote address>`."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            match = _BEARER.match(value)
            if match:
                return "token:" + match.group(1).decode()
            break
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


class RateLimitMiddleware:
    """Pure ASGI middleware: refuses over-limit requests under `prefix` with 429."""

    def __init__(self, app: ASGIApp, limiter: TokenBucketLimiter, prefix: str = "/api/") -> None:
        self.app = app
        self.limiter = limiter
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        decision = self.limiter.take(key)
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(decision.retry_after))
        who = "this token" if key.startswith("token:") else "this address"
        body = json.dumps(
            {
                "detail": {
                    "error": "rate_limited",
                    "check": "rate_limit",
                    "file": None,
                    "tensor": None,
                    "expected": f"at most {self.limiter.rate * 60:g} requests a minute "
                    f"(bursts of {self.limiter.burst:g})",
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
