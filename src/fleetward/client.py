"""A typed client of the operator API: what the CLI, the demo and the tests speak to fleetward with."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from fleetward.transport import check, network_error, trust

Model = TypeVar("Model", bound=BaseModel)


class FleetwardClient:
    """Calls the API with a bearer token; raises the :class:`FleetwardError` the server answered with."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ca_file: Path | None = None,
        timeout_seconds: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = trust(ca_file)
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout_seconds,
            verify=verify,
            transport=transport,
        )

    def __enter__(self) -> FleetwardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: dict[str, str | int] | None = None,
    ) -> httpx.Response:
        content = body.model_dump_json(exclude_unset=False).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
        except httpx.HTTPError as error:
            raise network_error(error, self.url) from None
        return check(response)

    def request_json(self, method: str, path: str, body: object) -> bytes:
        """Send any JSON value (a body that is no schema, such as a twin patch); the answer's bytes."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise network_error(error, self.url) from None
        return check(response).content

    def stream(
        self, method: str, url: str, params: dict[str, str]
    ) -> contextlib.AbstractContextManager[httpx.Response]:
        """A streamed response (server-sent events); the caller checks its status."""
        return self._http.stream(method, url, params=params, timeout=httpx.Timeout(30.0, read=None))

    def get(self, path: str, model: type[Model], params: dict[str, str | int] | None = None) -> Model:
        return model.model_validate_json(self.request("GET", path, params=params).content)

    def get_list(
        self, path: str, model: type[Model], params: dict[str, str | int] | None = None
    ) -> list[Model]:
        return TypeAdapter(list[model]).validate_json(  # type: ignore[valid-type]
            self.request("GET", path, params=params).content
        )

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path).content

    def post(self, path: str, body: BaseModel, model: type[Model]) -> Model:
        return model.model_validate_json(self.request("POST", path, body=body).content)

    def post_bytes(self, path: str, body: BaseModel) -> bytes:
        return self.request("POST", path, body=body).content

    def put(self, path: str, body: BaseModel, model: type[Model]) -> Model:
        return model.model_validate_json(self.request("PUT", path, body=body).content)

    def patch(self, path: str, body: BaseModel, model: type[Model]) -> Model:
        return model.model_validate_json(self.request("PATCH", path, body=body).content)

    def delete(self, path: str) -> None:
        self.request("DELETE", path)
