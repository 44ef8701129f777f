"""Checks made before any route reads a request body: the operator token and the body's size.

FastAPI reads and parses a body before it runs a route's dependencies, so the ``OperatorDep``
401 would come only after an unauthenticated client had sent (and the server had buffered) its
whole body. ``AuthBeforeBody`` answers 401 at once to a request that carries a body (any
method but GET, HEAD and OPTIONS) under the API without a valid token; Starlette's
``RequestBodyLimitMiddleware`` (installed beside it in ``create_app``) answers 413 to a declared
``Content-Length`` over the limit before reading, and cuts a streamed body at the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthBeforeBody:
    """Pure ASGI middleware: 401 for a body-carrying API request without a valid token.

    ``authorize(token)`` says whether a bearer token is an active operator's (it runs in the
    thread pool: it reads the database). The route's own dependency still decides who the
    operator is; this only keeps unauthenticated bodies from being read.
    """

    def __init__(self, app: ASGIApp, *, prefix: str, authorize: Callable[[str], bool]) -> None:
        self.app = app
        self.prefix = prefix
        self.authorize = authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] not in _NO_BODY
                and scope["path"].startswith(self.prefix)):
            detail = await self._refusal(Headers(scope=scope))
            if detail is not None:
                await _unauthorized(send, detail)
                return
        await self.app(scope, receive, send)

    async def _refusal(self, headers: Headers) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing bearer token"
        if not await run_in_threadpool(self.authorize, token.strip()):
            return "invalid or revoked token"
        return None


async def _unauthorized(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
