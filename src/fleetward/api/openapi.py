"""The API's OpenAPI document, without a running server."""

from __future__ import annotations

from typing import Any

from fleetward.api.app import create_app


def openapi_document() -> dict[str, Any]:
    return create_app(None).openapi()
