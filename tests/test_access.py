"""The pure core of operator authorization: what a role grants, how a token narrows it, and why it refuses.

No store and no server: ``Principal`` is a value, and every decision is a function of it.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetward.errors import PermissionDenied
from fleetward.registry.access import ROLE_SCOPES, Principal, format_scopes, parse_scopes
from fleetward.registry.models import Role, Scope

TENANT = "tenant-a"
OTHER = "tenant-b"
ALL = frozenset(Scope)


def principal(
    roles: dict[str, Role] | None = None,
    token_scopes: frozenset[Scope] = ALL,
    token_tenant_id: str | None = None,
    can_create_tenants: bool = False,
) -> Principal:
    return Principal(
        operator_id="operator-1",
        email="op@example.com",
        token_id="0123456789abcdef",
        token_tenant_id=token_tenant_id,
        token_scopes=token_scopes,
        roles=roles if roles is not None else {},
        can_create_tenants=can_create_tenants,
    )


def refusal(call: Principal, tenant_id: str, scope: Scope) -> str | None:
    """The code ``require`` refuses with, or ``None`` when it allows."""
    try:
        call.require(tenant_id, scope)
    except PermissionDenied as error:
        return error.code
    return None


# ------------------------------------------------------------------ roles


#: (role, scope, the code of the refusal or None when allowed), with an unrestricted all-scope token.
ROLE_TABLE: list[tuple[Role, Scope, str | None]] = [
    (Role.ADMINISTRATOR, Scope.READ, None),
    (Role.ADMINISTRATOR, Scope.WRITE, None),
    (Role.ADMINISTRATOR, Scope.DELETE, None),
    (Role.ADMINISTRATOR, Scope.ADMIN, None),
    (Role.CONTRIBUTOR, Scope.READ, None),
    (Role.CONTRIBUTOR, Scope.WRITE, None),
    (Role.CONTRIBUTOR, Scope.DELETE, "role_forbids"),
    (Role.CONTRIBUTOR, Scope.ADMIN, "role_forbids"),
    (Role.READER, Scope.READ, None),
    (Role.READER, Scope.WRITE, "role_forbids"),
    (Role.READER, Scope.DELETE, "role_forbids"),
    (Role.READER, Scope.ADMIN, "role_forbids"),
]


@pytest.mark.parametrize(("role", "scope", "expected"), ROLE_TABLE)
def test_each_role_grants_exactly_its_scopes(role: Role, scope: Scope, expected: str | None) -> None:
    """Administrator: everything; Contributor: read and change, not delete or administer; Reader: read."""
    assert refusal(principal({TENANT: role}), TENANT, scope) == expected
    assert (scope in principal({TENANT: role}).scopes_in(TENANT)) is (expected is None)


def test_the_role_table_covers_every_role_and_scope() -> None:
    assert {(role, scope) for role, scope, _ in ROLE_TABLE} == {(r, s) for r in Role for s in Scope}
    assert set(ROLE_SCOPES) == set(Role)


def test_a_role_refusal_names_the_role_and_the_action() -> None:
    with pytest.raises(PermissionDenied, match="Reader role does not permit you to delete") as caught:
        principal({TENANT: Role.READER}).require(TENANT, Scope.DELETE)
    assert caught.value.code == "role_forbids"


@pytest.mark.parametrize("scope", list(Scope))
def test_no_role_in_a_tenant_means_no_access_at_all(scope: Scope) -> None:
    """Default deny: a role elsewhere grants nothing here, and the tenant's existence is not revealed."""
    caller = principal({OTHER: Role.ADMINISTRATOR})
    assert refusal(caller, TENANT, scope) == "no_role_in_tenant"
    assert caller.scopes_in(TENANT) == frozenset()
    with pytest.raises(PermissionDenied, match="or it does not exist"):
        caller.require(TENANT, scope)


def test_roles_in_two_tenants_are_independent() -> None:
    caller = principal({TENANT: Role.ADMINISTRATOR, OTHER: Role.READER})
    assert refusal(caller, TENANT, Scope.DELETE) is None
    assert refusal(caller, OTHER, Scope.DELETE) == "role_forbids"
    assert caller.scopes_in(OTHER) == frozenset({Scope.READ})


# ------------------------------------------------------------------ token scopes


#: (token scopes, scope asked, refusal code) for an Administrator, who holds every scope by role.
TOKEN_TABLE: list[tuple[frozenset[Scope], Scope, str | None]] = [
    (frozenset({Scope.READ}), Scope.READ, None),
    (frozenset({Scope.READ}), Scope.WRITE, "token_scope_missing"),
    (frozenset({Scope.READ}), Scope.DELETE, "token_scope_missing"),
    (frozenset({Scope.READ}), Scope.ADMIN, "token_scope_missing"),
    (frozenset({Scope.READ, Scope.WRITE}), Scope.WRITE, None),
    (frozenset({Scope.READ, Scope.WRITE}), Scope.DELETE, "token_scope_missing"),
    (frozenset({Scope.WRITE}), Scope.READ, "token_scope_missing"),
    (frozenset({Scope.DELETE}), Scope.DELETE, None),
    (frozenset({Scope.ADMIN}), Scope.ADMIN, None),
    (frozenset({Scope.ADMIN}), Scope.READ, "token_scope_missing"),
]


@pytest.mark.parametrize(("token_scopes", "scope", "expected"), TOKEN_TABLE)
def test_a_token_narrows_what_the_role_grants(
    token_scopes: frozenset[Scope], scope: Scope, expected: str | None
) -> None:
    caller = principal({TENANT: Role.ADMINISTRATOR}, token_scopes=token_scopes)
    assert refusal(caller, TENANT, scope) == expected
    assert caller.scopes_in(TENANT) == token_scopes


def test_a_token_never_widens_what_the_role_grants() -> None:
    """A Reader with an all-scope token still only reads; the role's refusal is the one reported."""
    caller = principal({TENANT: Role.READER}, token_scopes=ALL)
    assert caller.scopes_in(TENANT) == frozenset({Scope.READ})
    assert refusal(caller, TENANT, Scope.WRITE) == "role_forbids"


def test_the_role_is_judged_before_the_token() -> None:
    """When both refuse, the caller learns that the role forbids it: a new token would not help."""
    caller = principal({TENANT: Role.CONTRIBUTOR}, token_scopes=frozenset({Scope.READ}))
    assert refusal(caller, TENANT, Scope.DELETE) == "role_forbids"
    assert refusal(caller, TENANT, Scope.WRITE) == "token_scope_missing"


def test_a_missing_token_scope_is_named_in_the_message() -> None:
    caller = principal({TENANT: Role.ADMINISTRATOR}, token_scopes=frozenset({Scope.READ}))
    with pytest.raises(PermissionDenied, match="lacks the 'write' scope"):
        caller.require(TENANT, Scope.WRITE)


# ------------------------------------------------------------------ tenant-restricted tokens


@pytest.mark.parametrize("scope", list(Scope))
def test_a_tenant_restricted_token_reaches_no_other_tenant(scope: Scope) -> None:
    """Even where the operator is Administrator, a token restricted to one tenant acts in that one only."""
    caller = principal({TENANT: Role.ADMINISTRATOR, OTHER: Role.ADMINISTRATOR}, token_tenant_id=TENANT)
    assert refusal(caller, TENANT, scope) is None
    assert refusal(caller, OTHER, scope) == "token_wrong_tenant"
    assert caller.scopes_in(OTHER) == frozenset()
    assert caller.scopes_in(TENANT) == ALL


def test_the_wrong_tenant_is_judged_before_the_role() -> None:
    """A restricted token used elsewhere says so, whether or not the operator has a role there."""
    caller = principal({TENANT: Role.READER}, token_tenant_id=TENANT)
    assert refusal(caller, "no-such-tenant", Scope.READ) == "token_wrong_tenant"


# ------------------------------------------------------------------ creating tenants


def test_an_operator_allowed_to_create_tenants_may_with_an_unrestricted_admin_token() -> None:
    principal(can_create_tenants=True).require_tenant_creation()


#: (can create tenants, token scopes, token tenant, refusal code)
TENANT_CREATION_TABLE: list[tuple[bool, frozenset[Scope], str | None, str]] = [
    (False, ALL, None, "cannot_create_tenants"),
    (False, frozenset({Scope.READ}), TENANT, "cannot_create_tenants"),
    (True, frozenset({Scope.READ, Scope.WRITE, Scope.DELETE}), None, "token_scope_missing"),
    (True, ALL, TENANT, "token_scope_missing"),
]


@pytest.mark.parametrize(("allowed", "token_scopes", "token_tenant", "expected"), TENANT_CREATION_TABLE)
def test_creating_tenants_needs_the_right_and_an_unrestricted_admin_token(
    allowed: bool, token_scopes: frozenset[Scope], token_tenant: str | None, expected: str
) -> None:
    caller = principal(
        {TENANT: Role.ADMINISTRATOR},
        token_scopes=token_scopes,
        token_tenant_id=token_tenant,
        can_create_tenants=allowed,
    )
    with pytest.raises(PermissionDenied) as caught:
        caller.require_tenant_creation()
    assert caught.value.code == expected


# ------------------------------------------------------------------ parsing scopes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("read", {Scope.READ}),
        ("read,write", {Scope.READ, Scope.WRITE}),
        (" read , write ,", {Scope.READ, Scope.WRITE}),
        ("admin,read,admin", {Scope.ADMIN, Scope.READ}),
        (["delete", "admin"], {Scope.DELETE, Scope.ADMIN}),
        (("read",), {Scope.READ}),
    ],
)
def test_scopes_parse_from_text_or_a_list(
    text: str | list[str] | tuple[str, ...], expected: set[Scope]
) -> None:
    assert parse_scopes(text) == frozenset(expected)


#: Input that is not a set of scopes, and what the error says.
BAD_SCOPES: list[tuple[str | list[str], str]] = [
    ("", "at least one scope"),
    (",, ,", "at least one scope"),
    ([], "at least one scope"),
    (["", " "], "at least one scope"),
    ("root", "unknown scope 'root'"),
    ("read,superuser", "unknown scope 'superuser'"),
    ("READ", "unknown scope 'READ'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SCOPES)
def test_bad_scopes_raise_value_error_saying_why(text: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scopes(text)


def test_an_unknown_scope_error_lists_the_known_ones_and_truncates_what_it_quotes() -> None:
    with pytest.raises(ValueError, match="scopes are read, write, delete, admin") as caught:
        parse_scopes("x" * 500)
    assert "x" * 33 not in str(caught.value)
    assert "x" * 32 in str(caught.value)


def test_surrounding_spaces_in_listed_scopes_are_trimmed() -> None:
    assert parse_scopes(["read", "write "]) == frozenset({Scope.READ, Scope.WRITE})


def test_scopes_format_in_a_stable_order() -> None:
    assert format_scopes(frozenset({Scope.ADMIN, Scope.READ, Scope.WRITE})) == "read,write,admin"
    assert format_scopes(ALL) == "read,write,delete,admin"


@given(st.sets(st.sampled_from(list(Scope)), min_size=1))
def test_formatted_scopes_parse_back_to_themselves(scopes: set[Scope]) -> None:
    assert parse_scopes(format_scopes(frozenset(scopes))) == frozenset(scopes)
