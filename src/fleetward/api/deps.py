"""Request dependencies: the services, and the principal behind the bearer token."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Depends, Header, Request

from fleetward.authority.service import AuthorityService
from fleetward.compose import Services
from fleetward.errors import Unauthenticated
from fleetward.registry.access import Principal
from fleetward.registry.service import RegistryService

MAX_AUTHORIZATION_CHARS = 256


def as_utc(moment: dt.datetime | None) -> dt.datetime | None:
    """A time from a query string: one without a zone is read as UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment is not None and moment.tzinfo is None else moment


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def registry(request: Request) -> RegistryService:
    return services(request).registry


def authority(request: Request) -> AuthorityService:
    return services(request).authority


def principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The operator behind ``Authorization: Bearer fwt_…``; 401 without a live token."""
    if authorization is None:
        raise Unauthenticated("this call needs an API token (Authorization: Bearer …)", code="token_missing")
    if len(authorization) > MAX_AUTHORIZATION_CHARS:
        raise Unauthenticated("the Authorization header is longer than any API token", code="token_malformed")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("use the Bearer scheme with an API token", code="token_malformed")
    return registry(request).authenticate(token.strip())


PrincipalDep = Annotated[Principal, Depends(principal)]
RegistryDep = Annotated[RegistryService, Depends(registry)]
AuthorityDep = Annotated[AuthorityService, Depends(authority)]
