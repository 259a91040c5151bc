"""Errors on the wire: every refusal is ``{"error": {"code": ..., "message": ...}}`` with a fitting status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetward.errors import (
    AccessDenied,
    ConfigurationError,
    Conflict,
    DeviceTimeout,
    FleetwardError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    SecurityRefusal,
    ServerError,
    TransportError,
    Unauthenticated,
)

logger = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[FleetwardError], int], ...] = (
    (PayloadTooLarge, 413),
    (InvalidInput, 400),
    (SecurityRefusal, 403),
    (Unauthenticated, 401),
    (AccessDenied, 403),
    (NotFound, 404),
    (Conflict, 409),
    (ServerError, 500),
    (DeviceTimeout, 504),
    (TransportError, 503),
    (ConfigurationError, 500),
)


def status_of(error: FleetwardError) -> int:
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 500


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every refusal."""
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(FleetwardError)
    async def _fleetward(_request: Request, error: FleetwardError) -> JSONResponse:
        status = status_of(error)
        if status >= 500:
            logger.error("request failed: %s (%s)", error.message, error.code)
        return error_response(status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return error_response(422, "invalid_input", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = getattr(error, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        return error_response(error.status_code, code, str(error.detail))
