"""Operator MFA: the TOTP core against RFC 6238 and RFC 4226, then enrolment, confirmation, token creation and
disabling through the real server (both stores) and the CLI.

Refusals are checked on the wire (HTTP status and ``error.code``); the secret is looked for, and must not
be found, in every answer after enrolment, in the events, in the logs and in the raw database row.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from fleetward.api import schemas
from fleetward.cli.main import app as cli_app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.config import Limits
from fleetward.errors import ConfigurationError, PermissionDenied
from fleetward.registry import mfa
from fleetward.registry.models import Role
from fleetward.registry.service import OperatorWithoutMfa, operators_without_mfa
from fleetward.server import BackgroundServer
from fleetward.store.schema import events, operators
from tests.conftest import TenantSetup

ADMIN_EMAIL = "admin@example.com"
STEP = dt.timedelta(seconds=mfa.STEP_SECONDS)

# RFC 6238 Appendix B (SHA-1 rows): the ASCII seed "12345678901234567890", 8-digit codes.
RFC6238_SEED = b"12345678901234567890"
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
# RFC 4226 Appendix D: HOTP of the same seed for counters 0 to 9, 6 digits.
RFC4226 = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]


def at(unix_seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC)


# ------------------------------------------------------------------ the pure core


@pytest.mark.parametrize(("unix_time", "code"), RFC6238_SHA1)
def test_totp_matches_the_sha1_vectors_of_rfc_6238(unix_time: int, code: str) -> None:
    assert mfa.totp(RFC6238_SEED, at(unix_time), digits=8) == code
    assert mfa.totp(RFC6238_SEED, at(unix_time)) == code[-6:]  # the 6-digit code is the same number, mod 10^6
    assert mfa.verify(RFC6238_SEED, code[-6:], at(unix_time), last_used_step=None) == unix_time // 30


def test_hotp_matches_the_vectors_of_rfc_4226() -> None:
    assert [mfa.hotp(RFC6238_SEED, counter) for counter in range(10)] == RFC4226


def test_a_code_is_accepted_one_step_either_side_and_not_two() -> None:
    secret, now = mfa.new_secret(), at(1_700_000_000)
    step = mfa.time_step(now)
    for offset in (-1, 0, 1):
        code = mfa.totp(secret, now + offset * STEP)
        assert mfa.verify(secret, code, now, last_used_step=None) == step + offset
    for offset in (-2, 2):
        assert mfa.verify(secret, mfa.totp(secret, now + offset * STEP), now, last_used_step=None) is None
    late = mfa.totp(secret, now - STEP)
    assert mfa.verify(secret, late, now, window_steps=0, last_used_step=None) is None
    assert mfa.verify(secret, late, now, window_steps=2, last_used_step=None) == step - 1


def test_a_code_of_a_step_already_used_or_older_is_a_replay() -> None:
    secret, now = mfa.new_secret(), at(1_700_000_000)
    step = mfa.time_step(now)
    code = mfa.totp(secret, now)
    assert mfa.verify(secret, code, now, last_used_step=None) == step
    assert mfa.verify(secret, code, now, last_used_step=step) is None
    assert mfa.verify(secret, mfa.totp(secret, now - STEP), now, last_used_step=step) is None
    assert mfa.verify(secret, mfa.totp(secret, now + STEP), now, last_used_step=step) == step + 1
    assert mfa.verify(secret, code, now, last_used_step=step - 1) == step


@pytest.mark.parametrize(
    "code",
    ["", "12345", "1234567", "abcdef", "12345a", "１２３４５６", "123-456", "1" * 17, " " * 16 + "123456"],
)
def test_a_malformed_code_is_refused_not_raised(code: str) -> None:
    secret, now = mfa.new_secret(), at(1_700_000_000)
    assert mfa.verify(secret, code, now, last_used_step=None) is None


def test_a_wrong_code_is_refused_and_spaces_as_apps_show_them_are_allowed() -> None:
    secret, now = mfa.new_secret(), at(1_700_000_000)
    right = mfa.totp(secret, now)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert mfa.verify(secret, wrong, now, last_used_step=None) is None
    assert mfa.verify(mfa.new_secret(), right, now, last_used_step=None) is None
    assert mfa.verify(secret, f"{right[:3]} {right[3:]}", now, last_used_step=None) == mfa.time_step(now)


def test_bad_arguments_raise_type_and_value_errors() -> None:
    secret = mfa.new_secret()
    with pytest.raises(ValueError, match="timezone-aware"):
        mfa.time_step(dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="window"):
        mfa.verify(secret, "123456", at(0), window_steps=11, last_used_step=None)
    with pytest.raises(TypeError):
        mfa.verify(secret, 123456, at(0), last_used_step=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16 to 64"):
        mfa.TotpState(b"short")
    with pytest.raises(ValueError, match="':'"):
        mfa.otpauth_uri(secret, "alice@example.com", "fleet:ward")


def test_a_new_secret_is_20_random_bytes_and_its_uri_carries_it_in_unpadded_base32() -> None:
    secret = mfa.new_secret()
    assert len(secret) == 20
    assert secret != mfa.new_secret()
    assert "=" not in mfa.base32_secret(secret)
    uri = urlsplit(mfa.otpauth_uri(secret, "alice+ops@example.com", "fleetward"))
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/fleetward:alice%2Bops%40example.com")
    query = {key: values[0] for key, values in parse_qs(uri.query).items()}
    assert query == {
        "secret": mfa.base32_secret(secret),
        "issuer": "fleetward",
        "algorithm": "SHA1",
        "digits": "6",
        "period": "30",
    }
    assert len(query["secret"]) == 32
    assert base64.b32decode(query["secret"]) == secret


def test_the_sealed_state_opens_only_with_its_key_and_label_and_does_not_show_the_secret() -> None:
    key, secret = os.urandom(32), mfa.new_secret()
    state = mfa.TotpState(secret, 56_666_666)
    sealed = mfa.seal_state(key, state, "operator a")
    assert mfa.open_state(key, sealed, "operator a") == state
    assert mfa.open_state(key, mfa.seal_state(key, mfa.TotpState(secret), "a"), "a").last_used_step is None
    assert secret not in sealed
    assert mfa.base32_secret(secret).encode() not in sealed
    assert sealed != mfa.seal_state(key, state, "operator a")  # a fresh nonce each time
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for wrong_key, blob, label in (
        (os.urandom(32), sealed, "operator a"),
        (key, sealed, "operator b"),
        (key, tampered, "operator a"),
        (key, b"fwm1", "operator a"),
        (key, b"garbage" * 8, "operator a"),
    ):
        with pytest.raises(ConfigurationError):
            mfa.open_state(wrong_key, blob, label)
    assert secret.hex() not in repr(state)
    assert repr(secret) not in repr(state)
    assert mfa.base32_secret(secret) not in repr(mfa.MfaEnrollment(mfa.base32_secret(secret), "otpauth://x"))


# ------------------------------------------------------------------ through the server


@pytest.fixture
def limits() -> Limits:
    """Room for the refusals one test makes on purpose before the throttle starts."""
    return Limits(mfa_max_failures=8)


def error_of(response: httpx.Response) -> tuple[int, str]:
    body: Any = response.json()
    assert "error" in body, f"expected a refusal, got {response.status_code}: {response.text[:300]}"
    return response.status_code, str(body["error"]["code"])


def token_body(name: str, code: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "scopes": ["read"]}
    if code is not None:
        body["mfa_code"] = code
    return body


class Operator:
    """An operator on the wire: their HTTP client, and the TOTP secret once they enrolled."""

    def __init__(self, http: httpx.Client, clock: FakeClock) -> None:
        self.http = http
        self._clock = clock
        self.secret: bytes | None = None
        self.answers: list[str] = []  # every answer after enrolment, to look for the secret in

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        response = self.http.request(method, path, json=body)
        self.answers.append(response.text)
        return response

    def enroll(self) -> dict[str, Any]:
        response = self.http.post("/v1/me/mfa")
        assert response.status_code == 201, response.text
        enrolled: dict[str, Any] = response.json()
        self.secret = base64.b32decode(enrolled["secret"] + "=" * (-len(enrolled["secret"]) % 8))
        return enrolled

    def code(self) -> str:
        assert self.secret is not None
        return mfa.totp(self.secret, self._clock.now())

    def status(self) -> str:
        return str(self.call("GET", "/v1/me/mfa").json()["status"])


@pytest.fixture
def admin_op(server: BackgroundServer, admin_token: str, clock: FakeClock) -> Iterator[Operator]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        yield Operator(http, clock)


@pytest.fixture
def bob(server: BackgroundServer, admin: FleetwardClient, clock: FakeClock) -> Iterator[Operator]:
    created = admin.post(
        "/v1/operators", schemas.OperatorCreate(email="bob@example.com", name="Bob"), schemas.OperatorCreated
    )
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {created.token}"}) as http:
        yield Operator(http, clock)


def test_enrol_confirm_then_token_creation_needs_a_fresh_code_until_mfa_is_disabled(
    admin_op: Operator, bob: Operator, clock: FakeClock
) -> None:
    assert admin_op.status() == "off"
    enrolled = admin_op.enroll()
    assert enrolled["status"] == "pending"
    assert enrolled["otpauth_uri"].startswith("otpauth://totp/fleetward:admin%40example.com?secret=")
    assert admin_op.status() == "pending"
    assert admin_op.call("GET", "/v1/me").json()["mfa_enabled"] is False
    pending = admin_op.call("POST", "/v1/tokens", token_body("while pending"))
    assert pending.status_code == 201, "a pending enrolment does not yet ask for codes"

    wrong = f"{(int(admin_op.code()) + 1) % 1_000_000:06d}"
    assert error_of(admin_op.call("POST", "/v1/me/mfa/confirm", {"code": wrong})) == (403, "mfa_invalid")
    confirmed = admin_op.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()})
    assert (confirmed.status_code, confirmed.json()) == (200, {"status": "on"})
    assert admin_op.call("GET", "/v1/me").json()["mfa_enabled"] is True
    listed = {item["email"]: item["mfa_enabled"] for item in admin_op.call("GET", "/v1/operators").json()}
    assert listed == {ADMIN_EMAIL: True, "bob@example.com": False}
    again = admin_op.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()})
    assert error_of(again) == (409, "mfa_already_enabled")
    assert error_of(admin_op.call("POST", "/v1/me/mfa")) == (409, "mfa_already_enabled")

    assert error_of(admin_op.call("POST", "/v1/tokens", token_body("no code"))) == (403, "mfa_required")
    replayed = admin_op.call("POST", "/v1/tokens", token_body("replay", admin_op.code()))
    assert error_of(replayed) == (403, "mfa_invalid"), "the code that confirmed MFA is spent"
    clock.advance(30)
    code = admin_op.code()
    created = admin_op.call("POST", "/v1/tokens", token_body("laptop", code))
    assert created.status_code == 201, created.text
    assert error_of(admin_op.call("POST", "/v1/tokens", token_body("twice", code))) == (403, "mfa_invalid")
    for_bob = admin_op.call("POST", "/v1/operators/bob@example.com/tokens", token_body("for bob"))
    assert error_of(for_bob) == (403, "mfa_required"), "the caller's MFA guards tokens made for others too"
    assert bob.call("POST", "/v1/tokens", token_body("bob's own")).status_code == 201, "bob has no MFA"

    clock.advance(30)
    disabled_wrong = admin_op.call("POST", "/v1/me/mfa/disable", {"code": wrong})
    assert error_of(disabled_wrong) == (403, "mfa_invalid")
    disabled = admin_op.call("POST", "/v1/me/mfa/disable", {"code": admin_op.code()})
    assert (disabled.status_code, disabled.json()) == (200, {"status": "off"})
    assert admin_op.status() == "off"
    assert admin_op.call("POST", "/v1/tokens", token_body("after")).status_code == 201

    history = [
        (item["code"], item["severity"])
        for item in admin_op.call("GET", "/v1/events", None).json()
        if item["kind"] == "operator" and item["code"].startswith("mfa_")
    ]
    assert list(reversed(history)) == [
        ("mfa_enrolled", "info"),
        ("mfa_refused", "warning"),
        ("mfa_enabled", "info"),
        ("mfa_refused", "warning"),  # no code
        ("mfa_refused", "warning"),  # the replay
        ("mfa_refused", "warning"),  # the same code twice
        ("mfa_refused", "warning"),  # no code, for bob
        ("mfa_refused", "warning"),  # the wrong code to disable
        ("mfa_disabled", "warning"),
    ]


def test_another_operator_cannot_confirm_or_disable_my_mfa(
    admin_op: Operator, bob: Operator, clock: FakeClock
) -> None:
    admin_op.enroll()
    mine = admin_op.code()
    assert error_of(bob.call("POST", "/v1/me/mfa/confirm", {"code": mine})) == (409, "mfa_not_enrolled")
    assert admin_op.status() == "pending"
    assert admin_op.call("POST", "/v1/me/mfa/confirm", {"code": mine}).status_code == 200
    clock.advance(30)
    assert error_of(bob.call("POST", "/v1/me/mfa/disable", {"code": admin_op.code()})) == (
        409,
        "mfa_not_enrolled",
    )
    bob.enroll()
    assert error_of(bob.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()})) == (403, "mfa_invalid")
    assert (admin_op.status(), bob.status()) == ("on", "pending")
    assert admin_op.call("POST", "/v1/tokens", token_body("still mine", admin_op.code())).status_code == 201


def test_changing_mfa_needs_an_admin_token(admin_op: Operator, server: BackgroundServer) -> None:
    created = admin_op.call("POST", "/v1/tokens", token_body("read only"))
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {created.json()['secret']}"}
    ) as read_only:
        assert error_of(read_only.post("/v1/me/mfa")) == (403, "token_scope_missing")
        assert read_only.get("/v1/me/mfa").json() == {"status": "off"}
    admin_op.enroll()
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {created.json()['secret']}"}
    ) as read_only:
        refused = read_only.post("/v1/me/mfa/confirm", json={"code": admin_op.code()})
        assert error_of(refused) == (403, "token_scope_missing")
    assert admin_op.status() == "pending"


def test_wrong_codes_are_throttled_and_the_right_one_waits_out_the_window(
    admin_op: Operator, clock: FakeClock, services: Services
) -> None:
    admin_op.enroll()
    assert admin_op.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()}).status_code == 200
    for _ in range(services.settings.limits.mfa_max_failures):
        clock.advance(30)
        assert error_of(admin_op.call("POST", "/v1/tokens", token_body("guess", "000000"))) == (
            403,
            "mfa_invalid",
        )
    clock.advance(30)
    throttled = admin_op.call("POST", "/v1/tokens", token_body("right, too late", admin_op.code()))
    assert error_of(throttled) == (403, "mfa_throttled")
    clock.advance(services.settings.limits.mfa_failure_window_seconds)
    assert admin_op.call("POST", "/v1/tokens", token_body("right", admin_op.code())).status_code == 201


def test_the_secret_is_shown_once_and_found_nowhere_else(
    admin_op: Operator, clock: FakeClock, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Not in any later answer, not in events, not in logs; the database row holds it only sealed."""
    caplog.set_level(logging.DEBUG)
    enrolled = admin_op.enroll()
    admin_op.call("POST", "/v1/me/mfa/confirm", {"code": "000000"})
    admin_op.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()})
    clock.advance(30)
    admin_op.call("POST", "/v1/tokens", token_body("laptop", admin_op.code()))
    admin_op.call("GET", "/v1/me")
    admin_op.call("GET", "/v1/me/mfa")
    admin_op.call("GET", "/v1/operators")
    admin_op.call("GET", "/v1/events")
    assert admin_op.secret is not None
    forms = {enrolled["secret"], enrolled["secret"].lower(), admin_op.secret.hex(), enrolled["otpauth_uri"]}
    for text in [*admin_op.answers, caplog.text]:
        assert not {form for form in forms if form in text}
    with services.database.read() as connection:
        row = connection.execute(sa.select(operators).where(operators.c.email == ADMIN_EMAIL)).one()
        logged = connection.execute(sa.select(events.c.detail, events.c.actor, events.c.code)).all()
    assert row.mfa_enabled_at is not None
    sealed: bytes = row.mfa_secret_sealed
    assert admin_op.secret not in sealed
    assert enrolled["secret"].encode() not in sealed
    assert not {form for form in forms if any(form in str(value) for value in row)}
    assert not {form for form in forms if any(form in str(value) for item in logged for value in item)}


def test_operators_without_mfa_are_those_with_a_role_whose_mfa_is_not_on(
    admin_op: Operator, bob: Operator, tenant: TenantSetup, services: Services, admin: FleetwardClient
) -> None:
    admin.post(
        "/v1/operators", schemas.OperatorCreate(email="carol@example.com", name="C"), schemas.OperatorCreated
    )
    admin.put(
        f"/v1/tenants/{tenant.id}/roles",
        schemas.RoleAssign(email="bob@example.com", role=Role.READER),
        schemas.RolePublic,
    )

    def without() -> list[tuple[str, Role]]:
        with services.database.read() as connection:
            found = operators_without_mfa(connection, tenant.id)
        assert all(isinstance(item, OperatorWithoutMfa) and item.operator_id for item in found)
        return [(item.email, item.role) for item in found]

    assert without() == [(ADMIN_EMAIL, Role.ADMINISTRATOR), ("bob@example.com", Role.READER)]
    admin_op.enroll()
    bob.enroll()
    assert admin_op.call("POST", "/v1/me/mfa/confirm", {"code": admin_op.code()}).status_code == 200
    assert without() == [("bob@example.com", Role.READER)], "carol holds no role; bob is only pending"
    with services.database.read() as connection:
        assert operators_without_mfa(connection, "no-such-tenant") == []


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str | None]:
    cleaned: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    cleaned["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    return cleaned


def test_the_cli_enrols_confirms_creates_a_token_with_a_code_and_disables(
    server: BackgroundServer, admin_token: str, cli_env: dict[str, str | None], clock: FakeClock
) -> None:
    def run(*args: str) -> Result:
        return CliRunner().invoke(cli_app, ["--url", server.url, "--token", admin_token, *args], env=cli_env)

    shown = run("operator", "mfa", "enroll")
    assert shown.exit_code == 0, shown.output
    secret_text = shown.stdout.split("Secret (base32):")[1].split()[0]
    assert "otpauth://totp/fleetward:admin%40example.com?secret=" + secret_text in shown.stdout
    secret = base64.b32decode(secret_text + "=" * (-len(secret_text) % 8))
    assert json.loads(run("--json", "operator", "mfa", "status").stdout) == {"status": "pending"}

    assert run("operator", "mfa", "confirm", mfa.totp(secret, clock.now())).exit_code == 0
    refused = run("token", "create", "ci")  # the console script prints what the API refused, and exits 1
    assert isinstance(refused.exception, PermissionDenied)
    assert refused.exception.code == "mfa_required"
    assert "--mfa-code" in refused.exception.message
    clock.advance(30)
    created = run("--json", "token", "create", "ci", "--mfa-code", mfa.totp(secret, clock.now()))
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["token"]["name"] == "ci"
    listed = json.loads(run("--json", "operator", "list").stdout)
    assert [item["mfa_enabled"] for item in listed] == [True]
    assert json.loads(run("--json", "me").stdout)["mfa_enabled"] is True

    clock.advance(30)
    assert run("operator", "mfa", "disable", "--code", mfa.totp(secret, clock.now())).exit_code == 0
    assert json.loads(run("--json", "operator", "mfa", "status").stdout) == {"status": "off"}
    assert run("token", "create", "after").exit_code == 0
