"""One id per HTTP request, in the `X-Request-Id` response header, the log and every 500.

A client or proxy that sends `X-Request-Id` has it honoured (as vLLM does): the response
carries it back and the completion ids are made from it, so one id follows a request from
the load balancer's log to this server's. Otherwise the server makes one. A pure ASGI
middleware (not Starlette's BaseHTTPMiddleware, which wraps the receive channel that the
streaming responses watch for disconnects) that only adds a header to the response start.
"""

from __future__ import annotations

import re
import uuid

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
# What an incoming id may be: visible ASCII and bounded, so it can go into logs and headers
# as it is; anything else is replaced by an id of ours.
_VALID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id(request: Request) -> str:
    """This request's id (set by RequestIdMiddleware before any route or handler runs)."""
    return request.scope["state"]["request_id"]


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        rid = incoming if _VALID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.lower().encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
