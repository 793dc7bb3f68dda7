"""ASGI middleware: /v1 needs `Authorization: Bearer <key>`, checked before the body is parsed."""
from __future__ import annotations

import secrets
from typing import Any

from rempd.api.errors import error_response


class RequireApiKey:
    def __init__(self, app: Any, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
