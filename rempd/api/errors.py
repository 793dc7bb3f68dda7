"""Every non-2xx answer, on both APIs, in OpenAI's error body: {"error": {message, type, param, code}}.

The openai client unwraps that body into its typed exceptions, and the load generators log its
message, so FastAPI's own {"detail": ...} shapes (422, 404, 405) are rewritten here too.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rempd.protocol import ErrorResponse

log = logging.getLogger("rempd.api")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
                   503: "service_unavailable"}


class APIError(Exception):
    """Raise from a route to answer with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param,
                              code=self.code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after_s: int = 5) -> APIError:
    # Retry-After makes the openai client back off and retry on its own.
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after_s)})


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(message, type or _TYPE_BY_STATUS.get(status, "server_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route, so the OpenAPI schema (and schemathesis) knows its error answers."""
    return {status: {"model": ErrorResponse, "description": _TYPE_BY_STATUS.get(status, "error")}
            for status in statuses}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",):
        return "the request body must be a JSON object", None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")  # pydantic's prefix for our own
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")
