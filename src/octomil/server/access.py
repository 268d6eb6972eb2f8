"""Who may call what, and how often: API keys on ``/v1/*``, the admin key on ``/admin/*``, and
per-key limits on the generation endpoints (a request rate and generations in flight).

Pure ASGI middleware (like :mod:`octomil.server.middleware`) so a streaming response passes
straight through: a generation counts as in flight until its last byte is sent. Without API keys
``/v1/*`` is open and limits apply per client address instead of per key.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from octomil.server.errors import APIError, error_response
from octomil.server.keys import KeyRing, key_id
from octomil.server.limits import InFlight, RateLimiter, retry_after

logger = logging.getLogger("octomil.server.access")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
_BEARER = {"WWW-Authenticate": "Bearer"}


def bearer(scope: Scope) -> bytes:
    headers: dict[bytes, Any] = dict(scope.get("headers", ()))
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _missing() -> APIError:
    return APIError(
        401,
        "missing API key: send 'Authorization: Bearer <key>'",
        code="missing_api_key",
        headers=_BEARER,
    )


def _invalid() -> APIError:
    return APIError(401, "incorrect API key provided", code="invalid_api_key", headers=_BEARER)


class AccessMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        rate: RateLimiter | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.rate = rate
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/admin/"):
            err = self._admin(scope)
        elif path.startswith("/v1/"):
            err = self._api(scope)
        else:
            err = None
        if err is not None:
            await error_response(err)(scope, receive, send)
            return
        caller = scope.setdefault("state", {}).get("caller")
        if caller is None or scope["method"] != "POST" or path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        # In-flight first: a request refused for that does not spend the key's rate.
        if self.in_flight is not None and not self.in_flight.enter(caller):
            err = APIError(
                429,
                f"{caller} already has {self.in_flight.limit} generations in flight "
                "(--max-streams-per-key); retry when one ends",
                code="too_many_streams",
                headers={"Retry-After": "1"},
            )
            await error_response(err)(scope, receive, send)
            return
        try:
            if self.rate is not None and (wait := self.rate.acquire(caller)) > 0:
                err = APIError(
                    429,
                    f"rate limit reached for {caller} ({self.rate.rate} requests); retry in "
                    f"{wait:.1f} s",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": retry_after(wait)},
                )
                await error_response(err)(scope, receive, send)
                return
            await self.app(scope, receive, send)
        finally:
            if self.in_flight is not None:
                self.in_flight.leave(caller)

    def _api(self, scope: Scope) -> APIError | None:
        state = scope.setdefault("state", {})
        if self.keys.open:
            client = scope.get("client") or ("unknown", 0)
            state["caller"] = f"ip-{client[0]}"
            return None
        token = bearer(scope)
        if not token:
            return _missing()
        if not self.keys.match_api(token):
            return _invalid()
        state["caller"] = key_id(token)
        return None

    def _admin(self, scope: Scope) -> APIError | None:
        if self.keys.admin_key is None:
            return APIError(
                403,
                "admin endpoints are disabled: start the server with --admin-key",
                code="admin_disabled",
            )
        token = bearer(scope)
        if not token:
            return _missing()
        if self.keys.match_admin(token):
            scope.setdefault("state", {})["caller"] = "admin-" + key_id(token)
            return None
        if self.keys.match_api(token):
            return APIError(403, "this API key is not the admin key", code="not_admin")
        return _invalid()
