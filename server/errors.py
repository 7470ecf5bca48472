"""OpenAI-shaped errors: every failure a client sees is `{"error": {...}}`, never a traceback.

OpenAI's SDKs map the HTTP status to an exception class and read `error.message`,
so the status is what matters for control flow and the message is for humans.
Handlers here catch everything that can escape a route, including bugs. A 500 never
carries an exception's text (it may name server files): the client gets a generic
message with the request id, the log gets the detail with the same id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.request_id import HEADER, request_id

logger = logging.getLogger("engram_serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error meant for the client: status, message and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def internal_error(rid: str, code: str = "internal_error") -> APIError:
    """The 500 a client sees, whatever failed: no detail, the id to quote (OpenAI's wording)."""
    return APIError(500, f"The server had an error while processing your request. Retry it, or report "
                    f"request id {rid} to the server's operator if the error persists.", code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status)


def _param(error: dict) -> str | None:
    """The field a pydantic error is about, dotted, without the body location prefix."""
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as 'field: reason', or every unsupported field's; the body location
    prefix is dropped."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    unsupported = [(_param(e), e["msg"]) for e in errors if e.get("type") == "unsupported"]
    if unsupported:  # named all at once: the client learns in one round what to leave out
        return "; ".join(f"{param}: {msg}" for param, msg in unsupported), unsupported[0][0]
    first = errors[0]
    param = _param(first)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing" and param is None:
        return "request body is required", None
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler outside every middleware: the id header is set here.
        rid = request_id(request)
        logger.exception("request %s: unhandled error in %s %s", rid, request.method, request.url.path)
        response = error_response(internal_error(rid))
        response.headers[HEADER] = rid
        return response
