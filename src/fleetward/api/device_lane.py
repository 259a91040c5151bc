"""The device lane: the two attestation routes served straight from ASGI, in front of the operator API.

Every device enrolls daily, so these two requests are most of the traffic. Routing them here skips the
middleware and routing of the operator API (measured: bench/enroll.py); they keep the same limits, the same
error format and the same code (``routes_attestation``). Everything else passes through to FastAPI.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from fleetward.api.errors import error_body, status_of
from fleetward.api.routes_attestation import (
    CERTIFICATE_PATH,
    NONCE_PATH,
    answer_certificate,
    answer_nonce,
)
from fleetward.errors import FleetwardError, PayloadTooLarge

logger = logging.getLogger(__name__)

_JSON_HEADERS = [(b"content-type", b"application/json")]


class DeviceLane:
    """ASGI app: ``POST`` to the two device paths is answered here; anything else goes to ``app``."""

    def __init__(self, app: FastAPI, max_body_bytes: int) -> None:
        self.app = app
        self._limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in (NONCE_PATH, CERTIFICATE_PATH):
            await self.app(scope, receive, send)
            return
        state = self.app.state

        async def read_body() -> bytes:
            return await self._read(scope, receive)

        try:
            if path == NONCE_PATH:
                body = await answer_nonce(state.services.authority, read_body)
            else:
                body = await answer_certificate(state.services.authority, state.enrollments, read_body)
            status = 200
        except FleetwardError as error:
            status = status_of(error)
            if status >= 500:
                logger.error("device request failed: %s (%s)", error.message, error.code)
            body = error_body(error.code, error.message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self._limit):
                raise PayloadTooLarge(f"the request body is larger than {self._limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise PayloadTooLarge(f"the request body is larger than {self._limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
