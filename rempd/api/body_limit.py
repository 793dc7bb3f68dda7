"""ASGI middleware: a request body larger than the limit is refused with 413 before it is read into memory.

A declared Content-Length over the limit is refused at once; a chunked body is counted as it arrives and
refused as soon as it passes the limit, so a client cannot make the daemon buffer an unbounded body."""
from __future__ import annotations

from typing import Any

from rempd.api.errors import error_response
from rempd.config import DEFAULT_MAX_REQUEST_BYTES


class LimitBody:
    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def refusal(self) -> Any:
        return error_response(413, f"the request body is larger than this server's limit of {self.max_bytes} "
                                   "bytes", type="invalid_request_error", code="request_too_large")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refusal()(scope, receive, send)
        seen = 0
        refused = False

        async def counted_receive() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # answer now and tell the app the client left: a raise here would reach the client as
                    # the framework's generic "error parsing the body"
                    refused = True
                    await self.refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)
