"""Server-sent events: the response that carries a streamed completion, and the encoding of one event."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse


class EventStream(StreamingResponse):
    """An SSE response that releases its request however it ends, even if its body never started."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.cleanup()


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
