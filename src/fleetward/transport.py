"""The client side of the API's error format, shared by the CLI and the agent.

An answer that is not a success becomes the :class:`FleetwardError` the server raised (same class family,
same code, same message); a network failure becomes a :class:`TransportError`.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx

from fleetward.errors import (
    AttestationRefused,
    ConfigurationError,
    Conflict,
    FleetwardError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServerError,
    TransportError,
    Unauthenticated,
)


def error_from_response(response: httpx.Response) -> FleetwardError:
    """The error an unsuccessful answer stands for."""
    code, message = "http_error", f"the server answered {response.status_code}"
    try:
        body = json.loads(response.content)
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    status = response.status_code
    if status == 401:
        return Unauthenticated(message, code=code)
    if status == 403:
        if code.startswith(("nonce_", "csr_", "evidence_", "device_", "measurement", "too_many")):
            return AttestationRefused(message, code=code)
        return PermissionDenied(message, code=code)
    if status == 404:
        return NotFound(message, code=code)
    if status == 409:
        return Conflict(message, code=code)
    if status == 413:
        return PayloadTooLarge(message, code=code)
    if 400 <= status < 500:
        return InvalidInput(message, code=code)
    if status >= 500 and status != 503:
        return ServerError(message, code=code)
    return TransportError(message, code=code)


def check(response: httpx.Response) -> httpx.Response:
    """``response`` if it is a success, else raise the error it stands for."""
    if response.is_success:
        return response
    raise error_from_response(response)


def trust(ca_file: Path | None) -> ssl.SSLContext | bool:
    """What httpx should verify servers with: the system's CAs, or only those in ``ca_file``."""
    if ca_file is None:
        return True
    try:  # httpx deprecates verify=<path>: it wants the SSL context itself
        return ssl.create_default_context(cafile=str(ca_file))
    except OSError as error:
        raise ConfigurationError(f"cannot trust the CA file {ca_file}: {error}") from None


def network_error(error: httpx.HTTPError, url: str) -> TransportError:
    return TransportError(f"could not reach {url}: {type(error).__name__}", code="unreachable")
