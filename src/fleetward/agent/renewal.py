"""Renewal without anyone watching: when to renew the operational certificate, and the loop that does it.

The core decides and does no I/O. A credential is renewed at :func:`~fleetward.agent.enroll.renewal_time`
(its half-life plus up to a tenth of its validity of jitter, drawn once per certificate so that a fleet
spreads out). A failed attempt is retried after an exponential backoff with full jitter (a delay drawn
between 0 and ``first · 2^(n-1)``, capped), but never later than the last chance before expiry. A device
without a valid certificate (never enrolled, or offline past expiry) re-attests at once: that is the same
call, with the identity key alone, and the authority accepts it.

A refusal by the authority (the device revoked, its software below a floor) counts as a failure and is
retried on the same schedule, since its answer can change (an operator releases the device, an update
lands); the last refusal is kept until a success, logged with its code and reported.

The shell, :class:`Renewer`, runs the loop with an injected :class:`~fleetward.clock.Clock`: ``async for
outcome in renewer`` makes one attempt per item, when it is due; ``async with renewer`` runs the loop in a
task. Each new credential is saved atomically (:class:`~fleetward.agent.credential.CredentialFile`) before
``on_renewed`` hears of it; a refusal leaves the stored credential alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Protocol

from fleetward.agent.backoff import full_jitter
from fleetward.agent.credential import CredentialFile
from fleetward.agent.enroll import OperationalCredential, renewal_time
from fleetward.bounds import check_positive, seconds_may_be_fractions
from fleetward.clock import Clock, SystemClock
from fleetward.errors import AttestationRefused, ConfigurationError, FleetwardError
from fleetward.wire.evidence import EnrollmentResponse

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class RenewalPolicy:
    """The retry schedule, in seconds."""

    backoff_first_seconds: float = 30.0
    backoff_cap_seconds: float = 3600.0
    #: The last try before expiry starts at least this long before ``not_after``.
    last_chance_seconds: float = 300.0

    def __post_init__(self) -> None:
        check_positive(self, "renewal policy", fractional=seconds_may_be_fractions)
        if self.backoff_first_seconds > self.backoff_cap_seconds:
            raise ValueError("backoff_first_seconds cannot exceed backoff_cap_seconds")

    def last_chance(self, issued: EnrollmentResponse) -> dt.datetime:
        """When the last try before the certificate's expiry starts."""
        return issued.not_after - dt.timedelta(seconds=self.last_chance_seconds)


class Action(enum.StrEnum):
    RENEW = "renew"  # the certificate is valid: replace it before it expires
    REATTEST = "reattest"  # no valid certificate (none yet, expired, unusable): attest with the identity key


@dataclass(frozen=True)
class Refusal:
    """The authority's answer when it refused: its stable code and its message."""

    code: str
    message: str


@dataclass(frozen=True)
class RenewalState:
    """What the renewer knows between two attempts. Build it with :func:`fresh_state` and the two below."""

    issued: EnrollmentResponse | None = None  # the current certificate; None: none, or none usable
    renew_at: dt.datetime | None = None  # its renewal time, jitter drawn once
    failures: int = 0  # consecutive failed attempts since the last success
    retry_at: dt.datetime | None = None  # when to try again after the last failure
    last_refusal: Refusal | None = None  # kept until a success


@dataclass(frozen=True)
class Step:
    """The next thing to do, and when."""

    action: Action
    at: dt.datetime


def planned_renewal(issued: EnrollmentResponse, policy: RenewalPolicy, rng: random.Random) -> dt.datetime:
    """:func:`renewal_time` of ``issued``, no later than the last chance (a very short certificate)."""
    last_chance = policy.last_chance(issued)
    return max(issued.renew_after, min(renewal_time(issued, rng), last_chance))


def retry_delay(failures: int, policy: RenewalPolicy, rng: random.Random) -> dt.timedelta:
    """Full jitter: uniform between 0 and ``first · 2^(failures-1)``, that bound capped."""
    if failures < 1:
        raise ValueError("a retry follows at least one failure")
    return dt.timedelta(
        seconds=full_jitter(
            failures - 1, policy.backoff_first_seconds, policy.backoff_cap_seconds, rng.uniform
        )
    )


def fresh_state(issued: EnrollmentResponse | None, policy: RenewalPolicy, rng: random.Random) -> RenewalState:
    """The state for a credential just earned or just loaded (``None``: there is none)."""
    if issued is None:
        return RenewalState()
    return RenewalState(issued=issued, renew_at=planned_renewal(issued, policy, rng))


def after_failure(
    state: RenewalState,
    now: dt.datetime,
    policy: RenewalPolicy,
    rng: random.Random,
    refusal: Refusal | None = None,
) -> RenewalState:
    """The state after an attempt failed at ``now`` (refused when ``refusal`` is given)."""
    failures = state.failures + 1
    retry_at = now + retry_delay(failures, policy, rng)
    if state.issued is not None:
        last_chance = policy.last_chance(state.issued)
        if now < last_chance:  # never past expiry without one more try
            retry_at = min(retry_at, last_chance)
    return replace(state, failures=failures, retry_at=retry_at, last_refusal=refusal or state.last_refusal)


def next_step(state: RenewalState, now: dt.datetime) -> Step:
    """What to do next and when (``at`` is ``now`` when it is due)."""
    issued = state.issued
    action = Action.REATTEST if issued is None or now >= issued.not_after else Action.RENEW
    if state.failures and state.retry_at is not None:
        at = state.retry_at
    elif action is Action.RENEW and state.renew_at is not None:
        at = state.renew_at
    else:
        at = now
    return Step(action, max(at, now))


# ---------------------------------------------------------------------------------------------- the shell


class Enroll(Protocol):
    """Attest and earn a new credential, e.g. ``lambda: client.enroll(measured_log())``."""

    def __call__(self) -> Awaitable[OperationalCredential]: ...


class OnRenewed(Protocol):
    def __call__(self, credential: OperationalCredential) -> Awaitable[None]: ...


class OnRefused(Protocol):
    def __call__(self, refusal: Refusal) -> Awaitable[None]: ...


@dataclass(frozen=True)
class Renewed:
    action: Action
    credential: OperationalCredential
    next_at: dt.datetime


@dataclass(frozen=True)
class Refused:
    action: Action
    refusal: Refusal
    failures: int
    retry_at: dt.datetime


@dataclass(frozen=True)
class Failed:
    """The attempt did not reach a verdict (network, server, disk): tried again at ``retry_at``."""

    action: Action
    code: str
    message: str
    failures: int
    retry_at: dt.datetime


Outcome = Renewed | Refused | Failed


class Renewer:
    """Keeps the device's operational credential valid, for as long as it runs.

    ``async for outcome in renewer`` waits until the next attempt is due, makes it and yields what came of
    it; ``async with renewer`` does the same in a task until the block ends. The clock is polled at least
    every ``poll_seconds``: the wall clock is what certificates expire by, and it moves on while a device
    sleeps or when it corrects its time, where the event loop's monotonic clock does not.

    A :class:`ConfigurationError` (the root of trust cannot sign, for instance) stops the loop: retrying
    cannot fix it. Every other :class:`FleetwardError` is a failed attempt, retried with backoff.
    """

    def __init__(
        self,
        enroll: Enroll,
        store: CredentialFile,
        *,
        clock: Clock | None = None,
        policy: RenewalPolicy | None = None,
        rng: random.Random | None = None,
        on_renewed: OnRenewed | None = None,
        on_refused: OnRefused | None = None,
        poll_seconds: float = 60.0,
    ) -> None:
        if not poll_seconds > 0:
            raise ValueError("poll_seconds must be positive")
        self._enroll = enroll
        self._store = store
        self._clock = clock or SystemClock()
        self._policy = policy or RenewalPolicy()
        self._rng = rng or random.SystemRandom()
        self._on_renewed = on_renewed
        self._on_refused = on_refused
        self._poll_seconds = poll_seconds
        self._state: RenewalState | None = None
        self._credential: OperationalCredential | None = None
        self._forced = False
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> RenewalState:
        return self._load()

    @property
    def credential(self) -> OperationalCredential | None:
        """The credential in use (the stored one), or ``None``."""
        self._load()
        return self._credential

    def next_step(self) -> Step:
        now = self._clock.now()
        step = next_step(self._load(), now)
        return Step(step.action, now) if self._forced else step

    def renew_now(self) -> None:
        """Attempt at once, whatever the schedule (the hub refused the certificate, say)."""
        self._forced = True
        self._wake.set()

    # -------------------------------------------------------------------------------------- the loop

    def __aiter__(self) -> Renewer:
        return self

    async def __anext__(self) -> Outcome:
        if self._busy:
            raise RuntimeError("one loop at a time: this renewer is already running")
        self._busy = True
        try:
            await self._wait_until(self.next_step().at)
            self._forced = False
            return await self._attempt(self.next_step().action)
        finally:
            self._busy = False

    async def __aenter__(self) -> Renewer:
        self._load()
        self._task = asyncio.create_task(self._run(), name="fleetward-renewer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a ConfigurationError that stopped the loop surfaces here

    async def _run(self) -> None:
        try:
            while True:
                await self.__anext__()
        except ConfigurationError as error:
            logger.error("renewal stopped: %s (%s)", error.message, error.code)
            raise

    async def _wait_until(self, at: dt.datetime) -> None:
        while not self._forced:
            remaining = (at - self._clock.now()).total_seconds()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(remaining, self._poll_seconds))
            self._wake.clear()

    async def _attempt(self, action: Action) -> Outcome:
        state = self._load()
        try:
            credential = await self._enroll()
        except AttestationRefused as refused:
            refusal = Refusal(refused.code, refused.message)
            self._state = state = after_failure(state, self._clock.now(), self._policy, self._rng, refusal)
            assert state.retry_at is not None
            logger.warning(
                "the authority refused the %s: %s (%s); keeping the current credential, next try at %s",
                action.value,
                refusal.message,
                refusal.code,
                state.retry_at.isoformat(),
            )
            if self._on_refused is not None:
                await self._on_refused(refusal)
            return Refused(action, refusal, state.failures, state.retry_at)
        except ConfigurationError:
            raise
        except FleetwardError as error:
            return self._failed(action, state, error.code, error.message)
        try:
            await asyncio.to_thread(self._store.save, credential)  # fsync on flash can take a while
        except OSError as error:
            return self._failed(
                action, state, "credential_not_saved", f"cannot save the new credential: {error.strerror}"
            )
        self._credential = credential
        self._state = state = fresh_state(credential.issued, self._policy, self._rng)
        assert state.renew_at is not None
        logger.info(
            "%s: certificate %s valid until %s, next renewal at %s",
            "renewed" if action is Action.RENEW else "re-attested",
            credential.issued.serial,
            credential.issued.not_after.isoformat(),
            state.renew_at.isoformat(),
        )
        if self._on_renewed is not None:
            await self._on_renewed(credential)
        return Renewed(action, credential, state.renew_at)

    def _failed(self, action: Action, state: RenewalState, code: str, message: str) -> Failed:
        self._state = state = after_failure(state, self._clock.now(), self._policy, self._rng)
        assert state.retry_at is not None
        logger.warning(
            "the %s failed: %s (%s); attempt %d, next try at %s",
            action.value,
            message,
            code,
            state.failures,
            state.retry_at.isoformat(),
        )
        return Failed(action, code, message, state.failures, state.retry_at)

    def _load(self) -> RenewalState:
        """The state, read from the stored credential the first time; an unusable file means re-attesting."""
        if self._state is None:
            try:
                self._credential = self._store.load()
            except ConfigurationError as error:
                logger.error("%s (%s); re-attesting for a new credential", error.message, error.code)
                self._credential = None
            issued = self._credential.issued if self._credential else None
            self._state = fresh_state(issued, self._policy, self._rng)
        return self._state
