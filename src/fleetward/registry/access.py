"""Who may do what: the pure core of operator authorization.

A request's scopes in a tenant are those of the operator's role there, narrowed by the token's scopes,
and by the token's tenant if the token names one. Default deny: no role, no access.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetward.errors import PermissionDenied
from fleetward.registry.models import Role, Scope

ROLE_SCOPES: Mapping[Role, frozenset[Scope]] = {
    Role.ADMINISTRATOR: frozenset(Scope),
    Role.CONTRIBUTOR: frozenset({Scope.READ, Scope.WRITE}),
    Role.READER: frozenset({Scope.READ}),
}

_WHAT = {
    Scope.READ: "read",
    Scope.WRITE: "change",
    Scope.DELETE: "delete",
    Scope.ADMIN: "administer",
}


@dataclass(frozen=True)
class Principal:
    """An authenticated operator, as seen through the token of one request."""

    operator_id: str
    email: str
    token_id: str
    token_tenant_id: str | None
    token_scopes: frozenset[Scope]
    roles: Mapping[str, Role] = field(default_factory=dict)
    can_create_tenants: bool = False
    #: when the token of this request expires (``None``: never); a token it creates may not outlive it
    token_expires_at: dt.datetime | None = None

    def scopes_in(self, tenant_id: str) -> frozenset[Scope]:
        """What this request may do in ``tenant_id``."""
        if self.token_tenant_id is not None and self.token_tenant_id != tenant_id:
            return frozenset()
        role = self.roles.get(tenant_id)
        if role is None:
            return frozenset()
        return ROLE_SCOPES[role] & self.token_scopes

    def require(self, tenant_id: str, scope: Scope) -> None:
        """Return if this request may ``scope`` in ``tenant_id``; otherwise say precisely why not."""
        if self.token_tenant_id is not None and self.token_tenant_id != tenant_id:
            raise PermissionDenied(
                "this API token is restricted to another tenant", code="token_wrong_tenant"
            )
        role = self.roles.get(tenant_id)
        if role is None:
            raise PermissionDenied(
                "you hold no role in this tenant (or it does not exist)", code="no_role_in_tenant"
            )
        if scope not in ROLE_SCOPES[role]:
            raise PermissionDenied(
                f"the {role.value} role does not permit you to {_WHAT[scope]} here",
                code="role_forbids",
            )
        if scope not in self.token_scopes:
            raise PermissionDenied(
                f"this API token lacks the {scope.value!r} scope", code="token_scope_missing"
            )

    def require_tenant_creation(self) -> None:
        if not self.can_create_tenants:
            raise PermissionDenied(
                "creating tenants is reserved to operators allowed to", code="cannot_create_tenants"
            )
        if self.token_tenant_id is not None or Scope.ADMIN not in self.token_scopes:
            raise PermissionDenied(
                "creating tenants needs an unrestricted token with the 'admin' scope",
                code="token_scope_missing",
            )


def parse_scopes(text: str | list[str] | tuple[str, ...]) -> frozenset[Scope]:
    """Scopes from ``"read,write"`` or a list; ``ValueError`` names an unknown one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes: set[Scope] = set()
    for item in (part.strip() for part in items):
        if not item:
            continue
        try:
            scopes.add(Scope(item))
        except ValueError:
            known = ", ".join(scope.value for scope in Scope)
            raise ValueError(f"unknown scope {item[:32]!r}; scopes are {known}") from None
    if not scopes:
        raise ValueError("a token needs at least one scope")
    return frozenset(scopes)


def format_scopes(scopes: frozenset[Scope]) -> str:
    return ",".join(scope.value for scope in Scope if scope in scopes)
