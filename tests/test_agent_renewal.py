"""Renewal without anyone watching: the schedule (a pure core), the credential file, and the loop against
the real authority with a clock that moves only when told to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from fleetward.agent.credential import CredentialFile, decode_credential, encode_credential
from fleetward.agent.enroll import EnrollmentClient, OperationalCredential
from fleetward.agent.renewal import (
    Action,
    Failed,
    Refusal,
    Refused,
    RenewalPolicy,
    RenewalState,
    Renewed,
    Renewer,
    Step,
    after_failure,
    fresh_state,
    next_step,
    planned_renewal,
    retry_delay,
)
from fleetward.api import schemas
from fleetward.clock import FakeClock
from fleetward.errors import ConfigurationError
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice
from fleetward.wire.evidence import EnrollmentResponse
from tests.conftest import TenantSetup

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)
POLICY = RenewalPolicy()


class FixedRandom(random.Random):
    """A random source that always draws ``value`` (0 is the low end of every range, 1 the high end)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def issued(not_before: dt.datetime = T0, validity: dt.timedelta = DAY) -> EnrollmentResponse:
    """A certificate's times, as the authority answers them (the core reads nothing else)."""
    return EnrollmentResponse(
        device_id="d" * 64,
        tenant_id="tenant",
        serial="1",
        certificate="(not parsed by the core)",
        chain=[],
        not_before=not_before,
        not_after=not_before + validity,
        renew_after=not_before + validity / 2,
    )


# ------------------------------------------------------------------------------------- the core: schedule


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.0, T0 + DAY / 2),  # the half-life itself
        (0.5, T0 + DAY / 2 + DAY / 20),
        (1.0, T0 + DAY / 2 + DAY / 10),  # at most a tenth of the validity later
    ],
)
def test_a_valid_certificate_is_renewed_at_half_life_plus_jitter(draw: float, expected: dt.datetime) -> None:
    state = fresh_state(issued(), POLICY, FixedRandom(draw))
    assert next_step(state, T0 + dt.timedelta(hours=1)) == Step(Action.RENEW, expected)
    assert next_step(state, expected + dt.timedelta(seconds=1)).at == expected + dt.timedelta(seconds=1)


@given(rng=st.randoms(use_true_random=False), minutes=st.integers(10, 7 * 24 * 60))
def test_the_renewal_time_lies_between_half_life_and_the_jitter_bound_and_before_the_last_chance(
    rng: random.Random, minutes: int
) -> None:
    certificate = issued(validity=dt.timedelta(minutes=minutes))
    validity = certificate.not_after - certificate.not_before
    at = planned_renewal(certificate, POLICY, rng)
    assert certificate.renew_after <= at <= certificate.renew_after + validity / 10
    assert at <= max(
        certificate.renew_after, certificate.not_after - dt.timedelta(seconds=POLICY.last_chance_seconds)
    )


@given(rng=st.randoms(use_true_random=False))
def test_the_jitter_is_drawn_once_per_certificate_so_waking_up_does_not_move_it(rng: random.Random) -> None:
    state = fresh_state(issued(), POLICY, rng)
    moments = [T0 + dt.timedelta(hours=hour) for hour in range(12)]
    assert len({next_step(state, moment).at for moment in moments}) == 1


@pytest.mark.parametrize(
    ("failures", "bound_seconds"),
    [(1, 30), (2, 60), (3, 120), (4, 240), (5, 480), (6, 960), (7, 1920), (8, 3600), (9, 3600), (500, 3600)],
)
def test_the_backoff_doubles_from_30_seconds_up_to_a_one_hour_cap_with_full_jitter(
    failures: int, bound_seconds: int
) -> None:
    assert retry_delay(failures, POLICY, FixedRandom(1.0)) == dt.timedelta(seconds=bound_seconds)
    assert retry_delay(failures, POLICY, FixedRandom(0.0)) == dt.timedelta(0)
    assert retry_delay(failures, POLICY, FixedRandom(0.25)) == dt.timedelta(seconds=bound_seconds / 4)


@given(rng=st.randoms(use_true_random=False), failures=st.integers(1, 10_000))
def test_a_retry_delay_is_never_negative_and_never_above_the_cap(rng: random.Random, failures: int) -> None:
    delay = retry_delay(failures, POLICY, rng)
    assert dt.timedelta(0) <= delay <= dt.timedelta(seconds=POLICY.backoff_cap_seconds)


def test_failures_back_off_from_the_moment_of_the_failure() -> None:
    state = fresh_state(issued(), POLICY, FixedRandom(0.0))
    failed_at = T0 + DAY / 2
    for failures, bound in [(1, 30), (2, 60), (3, 120)]:
        state = after_failure(state, failed_at, POLICY, FixedRandom(1.0))
        assert state.failures == failures
        assert next_step(state, failed_at) == Step(Action.RENEW, failed_at + dt.timedelta(seconds=bound))


def test_a_retry_is_never_scheduled_past_expiry_without_one_more_try_before_it() -> None:
    state = fresh_state(issued(), POLICY, FixedRandom(0.0))
    state = after_failure(
        replace(state, failures=10), T0 + DAY - dt.timedelta(minutes=20), POLICY, FixedRandom(1.0)
    )
    last_chance = T0 + DAY - dt.timedelta(seconds=POLICY.last_chance_seconds)
    assert next_step(state, T0 + DAY - dt.timedelta(minutes=20)) == Step(Action.RENEW, last_chance)
    # that last try failed too: the next one waits its backoff, past expiry, and re-attests then
    state = after_failure(state, last_chance, POLICY, FixedRandom(1.0))
    assert next_step(state, last_chance) == Step(Action.RENEW, last_chance + dt.timedelta(hours=1))
    assert next_step(state, last_chance + dt.timedelta(hours=1)).action is Action.REATTEST


@pytest.mark.parametrize(
    ("state", "now", "expected"),
    [
        pytest.param(RenewalState(), T0, Step(Action.REATTEST, T0), id="never enrolled: at once"),
        pytest.param(
            fresh_state(issued(), POLICY, FixedRandom(0.0)),
            T0 + DAY,
            Step(Action.REATTEST, T0 + DAY),
            id="expired this instant: at once",
        ),
        pytest.param(
            fresh_state(issued(), POLICY, FixedRandom(0.0)),
            T0 + 30 * DAY,
            Step(Action.REATTEST, T0 + 30 * DAY),
            id="offline for a month: at once",
        ),
        pytest.param(
            after_failure(
                fresh_state(issued(), POLICY, FixedRandom(0.0)), T0 + DAY / 2, POLICY, FixedRandom(1)
            ),
            T0 + 3 * DAY,
            Step(Action.REATTEST, T0 + 3 * DAY),
            id="failed, then asleep past expiry: at once",
        ),
        pytest.param(
            after_failure(RenewalState(), T0, POLICY, FixedRandom(1.0)),
            T0,
            Step(Action.REATTEST, T0 + dt.timedelta(seconds=30)),
            id="first enrollment failed: backs off",
        ),
        pytest.param(
            after_failure(
                fresh_state(issued(), POLICY, FixedRandom(0.0)), T0 + DAY * 2, POLICY, FixedRandom(1.0)
            ),
            T0 + DAY * 2,
            Step(Action.REATTEST, T0 + DAY * 2 + dt.timedelta(seconds=30)),
            id="re-attestation failed: backs off",
        ),
    ],
)
def test_without_a_valid_certificate_the_device_re_attests(
    state: RenewalState, now: dt.datetime, expected: Step
) -> None:
    assert next_step(state, now) == expected


def test_the_last_refusal_is_kept_through_later_failures_and_cleared_by_a_success() -> None:
    revoked = Refusal("device_revoked", "the device is revoked")
    state = fresh_state(issued(), POLICY, FixedRandom(0.0))
    state = after_failure(state, T0 + DAY / 2, POLICY, FixedRandom(0.5), revoked)
    assert (state.failures, state.last_refusal) == (1, revoked)
    state = after_failure(state, T0 + DAY / 2, POLICY, FixedRandom(0.5))  # then the network failed
    assert (state.failures, state.last_refusal) == (2, revoked)
    floor = Refusal("measurement_below_floor", "panel-monitor 2.1.0 is below the floor")
    state = after_failure(state, T0 + DAY / 2, POLICY, FixedRandom(0.5), floor)
    assert (state.failures, state.last_refusal) == (3, floor)
    state = fresh_state(issued(T0 + DAY / 2), POLICY, FixedRandom(0.5))
    assert (state.failures, state.last_refusal, state.retry_at) == (0, None, None)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"backoff_first_seconds": 0}, ValueError),
        ({"backoff_cap_seconds": -1}, ValueError),
        ({"last_chance_seconds": 0.0}, ValueError),
        ({"backoff_first_seconds": 120, "backoff_cap_seconds": 60}, ValueError),
        ({"backoff_first_seconds": "30"}, TypeError),
        ({"backoff_cap_seconds": True}, TypeError),
    ],
)
def test_a_policy_with_bad_values_is_refused(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RenewalPolicy(**options)  # type: ignore[arg-type]


def test_a_retry_needs_a_failure() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        retry_delay(0, POLICY, FixedRandom(0.5))


# ------------------------------------------------------------------------------------- the credential file


def self_signed(not_before: dt.datetime = T0, validity: dt.timedelta = DAY) -> OperationalCredential:
    """A credential of the stored shape without an authority: key, certificate, a one-certificate chain."""
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = os.urandom(32).hex()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + validity)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    return OperationalCredential(
        key=key,
        issued=EnrollmentResponse(
            device_id=device_id,
            tenant_id="tenant-1",
            serial=f"{certificate.serial_number:x}",
            certificate=pem,
            chain=[pem],
            not_before=not_before,
            not_after=not_before + validity,
            renew_after=not_before + validity / 2,
        ),
    )


def test_a_saved_credential_loads_back_whole_with_mode_0600(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "agent" / "credential.pem")
    assert store.load() is None
    credential = self_signed()
    store.save(credential)
    assert store.path.stat().st_mode & 0o777 == 0o600
    loaded = store.load()
    assert loaded is not None
    assert loaded.issued == credential.issued
    assert loaded.key.private_numbers() == credential.key.private_numbers()
    assert list(store.path.parent.iterdir()) == [store.path]


def test_the_stored_file_is_what_tls_loads_directly(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "credential.pem")
    store.save(self_signed(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)))
    ssl.create_default_context().load_cert_chain(store.path)  # the header lines are skipped


def test_a_crash_between_write_and_rename_leaves_the_old_credential_whole(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "credential.pem")
    old, new = self_signed(), self_signed(T0 + DAY / 2)
    store.save(old)
    staged = store.stage(new)  # written and synced ... and then the power went
    assert staged.temporary.exists()
    after_reboot = CredentialFile(store.path)
    loaded = after_reboot.load()
    assert loaded is not None
    assert loaded.issued.serial == old.issued.serial
    after_reboot.save(new)  # the next save sweeps what the crash left
    assert list(tmp_path.iterdir()) == [store.path]
    reloaded = after_reboot.load()
    assert reloaded is not None
    assert reloaded.issued.serial == new.issued.serial


_WRITER = """
import sys
from pathlib import Path
from fleetward.agent.credential import CredentialFile, decode_credential
a, b = (decode_credential(Path(name).read_bytes()) for name in sys.argv[1:3])
store = CredentialFile(Path(sys.argv[3]))
store.save(a)
print("ready", flush=True)
while True:
    store.save(b)
    store.save(a)
"""


def test_a_writer_killed_at_any_moment_never_leaves_a_torn_credential(tmp_path: Path) -> None:
    credentials = {name: self_signed(T0 + DAY * index) for index, name in enumerate(("a", "b"))}
    for name, credential in credentials.items():
        CredentialFile(tmp_path / f"{name}.pem").save(credential)
    target = tmp_path / "live" / "credential.pem"
    serials = {credential.issued.serial for credential in credentials.values()}
    for delay in (0.05, 0.15, 0.3):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / "a.pem"), str(tmp_path / "b.pem"), str(target)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        subprocess.run(["sleep", str(delay)], check=True)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
        loaded = CredentialFile(target).load()
        assert loaded is not None
        assert loaded.issued.serial in serials


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda data: data[: len(data) // 2], "credential_unusable"),
        (lambda data: data.replace(b"# renew-after", b"# renew-later"), "credential_unusable"),
        (lambda data: b"", "credential_unusable"),
        (lambda data: data.split(b"-----BEGIN CERTIFICATE-----")[0], "credential_unusable"),
    ],
    ids=["truncated", "no renewal time", "empty", "key without certificate"],
)
def test_a_damaged_credential_is_refused_on_load(tmp_path: Path, mangle: object, code: str) -> None:
    store = CredentialFile(tmp_path / "credential.pem")
    store.save(self_signed())
    assert callable(mangle)
    store.path.write_bytes(mangle(store.path.read_bytes()))
    with pytest.raises(ConfigurationError) as refused:
        store.load()
    assert refused.value.code == code


def test_a_key_and_certificate_that_do_not_match_are_refused(tmp_path: Path) -> None:
    one, other = self_signed(), self_signed()
    mixed = OperationalCredential(key=other.key, issued=one.issued)
    with pytest.raises(ConfigurationError, match="does not match"):
        decode_credential(encode_credential(mixed))


def test_a_credential_others_may_read_is_refused(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "credential.pem")
    store.save(self_signed())
    store.path.chmod(0o640)
    with pytest.raises(ConfigurationError) as exposed:
        store.load()
    assert exposed.value.code == "credential_exposed"


# --------------------------------------------------------------------------- the loop, against the authority


class Cable(httpx.AsyncBaseTransport):
    """The device's network: real HTTP while plugged in, a connection error while not."""

    def __init__(self) -> None:
        self.plugged = True
        self._transport = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.plugged:
            raise httpx.ConnectError("the network is down", request=request)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()


@dataclass
class Agent:
    """One device's renewal: its network, its credential file, and what its callbacks heard."""

    device: SimulatedDevice
    cable: Cable
    store: CredentialFile
    clock: FakeClock
    client: EnrollmentClient
    renewed: list[OperationalCredential] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def renewer(self) -> Renewer:
        async def on_renewed(credential: OperationalCredential) -> None:
            self.renewed.append(credential)

        async def on_refused(refusal: Refusal) -> None:
            self.refused.append(refusal)

        return Renewer(
            lambda: self.client.enroll(self.device.software),
            self.store,
            clock=self.clock,
            rng=FixedRandom(0.37),
            on_renewed=on_renewed,
            on_refused=on_refused,
            poll_seconds=0.01,
        )

    def advance_to(self, moment: dt.datetime) -> None:
        self.clock.advance(max(0.0, (moment - self.clock.now()).total_seconds()))


@pytest.fixture
async def agent(
    server: BackgroundServer, tenant: TenantSetup, device: SimulatedDevice, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Agent]:
    tenant.claim(device)
    cable = Cable()
    async with httpx.AsyncClient(transport=cable, timeout=30) as http:
        client = EnrollmentClient(server.url, device.root_of_trust, http=http)
        yield Agent(device, cable, CredentialFile(tmp_path / "agent" / "credential.pem"), clock, client)


async def attempt(renewer: Renewer) -> Renewed | Refused | Failed:
    return await asyncio.wait_for(anext(renewer), 30)


async def test_the_renewer_enrolls_then_renews_at_half_life_with_a_new_key(agent: Agent) -> None:
    renewer = agent.renewer()
    first = await attempt(renewer)
    assert isinstance(first, Renewed)
    assert first.action is Action.REATTEST  # nothing stored yet: the first enrollment
    issued = first.credential.issued
    validity = issued.not_after - issued.not_before
    assert issued.renew_after <= first.next_at <= issued.renew_after + validity / 10
    assert renewer.next_step() == Step(Action.RENEW, first.next_at)

    agent.advance_to(first.next_at - dt.timedelta(seconds=1))
    with pytest.raises(TimeoutError):  # not due yet: nothing happens
        await asyncio.wait_for(anext(renewer), 0.3)
    agent.advance_to(first.next_at)
    second = await attempt(renewer)
    assert isinstance(second, Renewed)
    assert second.action is Action.RENEW
    assert second.credential.issued.serial != issued.serial
    assert second.credential.key.public_key() != first.credential.key.public_key()  # the key rotates too
    assert [credential.issued.serial for credential in agent.renewed] == [
        issued.serial,
        second.credential.issued.serial,
    ]
    stored = agent.store.load()
    assert stored is not None
    assert stored.issued == second.credential.issued
    assert agent.refused == []


async def test_a_device_offline_past_expiry_re_attests_and_recovers_by_itself(
    agent: Agent, tenant: TenantSetup
) -> None:
    renewer = agent.renewer()
    first = await attempt(renewer)
    assert isinstance(first, Renewed)
    agent.cable.plugged = False
    agent.advance_to(first.next_at)
    failures: list[Failed] = []
    for _ in range(3):
        outcome = await attempt(renewer)
        assert isinstance(outcome, Failed)
        assert outcome.code == "unreachable"
        assert outcome.action is Action.RENEW
        failures.append(outcome)
        bound = dt.timedelta(seconds=30 * 2 ** (outcome.failures - 1))
        assert agent.clock.now() <= outcome.retry_at <= agent.clock.now() + bound
        agent.advance_to(outcome.retry_at)
    assert [failure.failures for failure in failures] == [1, 2, 3]

    agent.advance_to(first.credential.issued.not_after + 2 * DAY)  # offline for two more days
    assert renewer.next_step() == Step(Action.REATTEST, agent.clock.now())
    agent.cable.plugged = True
    recovered = await attempt(renewer)
    assert isinstance(recovered, Renewed)
    assert recovered.action is Action.REATTEST
    assert recovered.credential.issued.not_before <= agent.clock.now() < recovered.credential.issued.not_after
    assert renewer.state.failures == 0
    assert len(tenant.certificates(agent.device.device_id)) == 2


async def test_a_renewer_started_with_an_expired_credential_on_disk_re_attests_at_once(agent: Agent) -> None:
    first = await attempt(agent.renewer())
    assert isinstance(first, Renewed)
    agent.advance_to(first.credential.issued.not_after + 7 * DAY)  # the device was off for a week
    restarted = agent.renewer()
    assert restarted.next_step() == Step(Action.REATTEST, agent.clock.now())
    outcome = await attempt(restarted)
    assert isinstance(outcome, Renewed)
    assert outcome.action is Action.REATTEST


async def test_a_refusal_keeps_the_old_credential_and_is_logged_and_reported_with_its_code(
    agent: Agent, tenant: TenantSetup, caplog: pytest.LogCaptureFixture
) -> None:
    renewer = agent.renewer()
    first = await attempt(renewer)
    assert isinstance(first, Renewed)
    before = agent.store.path.read_bytes()
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/{agent.device.device_id}/revoke",
        schemas.Revoke(),
        schemas.RevokedDevice,
    )
    agent.advance_to(first.next_at)
    with caplog.at_level(logging.WARNING, logger="fleetward.agent.renewal"):
        outcome = await attempt(renewer)
    assert isinstance(outcome, Refused)
    assert outcome.refusal.code == "device_revoked"
    assert outcome.failures == 1
    assert agent.refused == [outcome.refusal]
    assert renewer.state.last_refusal == outcome.refusal
    assert agent.store.path.read_bytes() == before
    assert renewer.credential is not None
    assert renewer.credential.issued.serial == first.credential.issued.serial
    assert any("device_revoked" in record.getMessage() for record in caplog.records)
    assert agent.renewed == [first.credential]


async def test_as_a_context_manager_the_renewer_runs_by_itself_and_the_link_reconnects_with_the_file(
    agent: Agent,
) -> None:
    reconnected: asyncio.Queue[str] = asyncio.Queue()

    async def reconnect(credential: OperationalCredential) -> None:
        context = ssl.create_default_context()
        context.load_cert_chain(agent.store.path)  # what the hub link does with the new certificate
        await reconnected.put(credential.issued.serial)

    renewer = Renewer(
        lambda: agent.client.enroll(agent.device.software),
        agent.store,
        clock=agent.clock,
        on_renewed=reconnect,
        poll_seconds=0.01,
    )
    async with renewer:
        first = await asyncio.wait_for(reconnected.get(), 30)
        agent.advance_to(renewer.next_step().at)
        second = await asyncio.wait_for(reconnected.get(), 30)
    assert first != second
    stored = agent.store.load()
    assert stored is not None
    assert stored.issued.serial == second


async def test_renew_now_attempts_at_once_whatever_the_schedule(agent: Agent) -> None:
    renewer = agent.renewer()
    first = await attempt(renewer)
    assert isinstance(first, Renewed)
    renewer.renew_now()
    second = await attempt(renewer)
    assert isinstance(second, Renewed)
    assert second.credential.issued.serial != first.credential.issued.serial
    assert renewer.next_step().at > agent.clock.now()  # back on schedule


async def test_an_unusable_stored_credential_is_replaced_by_re_attesting(agent: Agent) -> None:
    agent.store.path.parent.mkdir(parents=True)
    agent.store.path.write_bytes(b"# fleetward operational credential v1\n-----BEGIN PRIV")
    agent.store.path.chmod(0o600)
    renewer = agent.renewer()
    assert renewer.next_step() == Step(Action.REATTEST, agent.clock.now())
    outcome = await attempt(renewer)
    assert isinstance(outcome, Renewed)
    assert agent.store.load() is not None
