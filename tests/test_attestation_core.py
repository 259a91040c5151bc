"""The pure core of attestation without a server: nonces, prepare and judge, evidence bytes, versions, ids.

Everything here takes bytes and typed values and returns a verdict or raises, so the bad inputs are tables and
the codecs have property tests.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetward.agent.enroll import build_csr, build_enrollment
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.authority import attestation
from fleetward.authority.attestation import DeviceStanding, PreparedEnrollment, ReferencePolicy
from fleetward.authority.nonces import NonceCodec
from fleetward.config import Limits
from fleetward.errors import AttestationRefused, ConfigurationError
from fleetward.sim.fleet import image_digest, measurement
from fleetward.wire.evidence import (
    EnrollmentRequest,
    Evidence,
    Measurement,
    NonceRequest,
    measurement_log_digest,
)
from fleetward.wire.identity import check_device_id, device_id_for, load_public_key, public_key_sha256
from fleetward.wire.versions import check_version, parse_version

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(seconds=120)
NONCE_LENGTH_BYTES = 1 + 8 + 32 + 16 + 16
WIRE_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,256}$")

AGENT = measurement("fleetward-agent", "1.4.0")
APP = measurement("panel-monitor", "2.1.0")
SOFTWARE = (AGENT, APP)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

device_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
moments = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)
)


# ---------------------------------------------------------------------------------------------- helpers


def codec(key: bytes | None = None) -> NonceCodec:
    return NonceCodec(key or secrets.token_bytes(32), TTL)


def new_device_id() -> str:
    return secrets.token_hex(32)


def nonce_bytes(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def nonce_text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def refusal_code(action: Callable[[], object]) -> str:
    with pytest.raises(AttestationRefused) as refused:
        action()
    return refused.value.code


def csr_pem(key: SigningKey, common_name: str = "device") -> str:
    """A well-signed CSR for any kind of key (the agent's ``build_csr`` takes EC keys only)."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def pem_of_csr_der(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode("ascii"), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def edited_csr(pem: str, old: bytes, new: bytes) -> str:
    """``pem`` with the DER bytes ``old`` replaced once by ``new`` (and so, unless re-signed, a bad CSR)."""
    der = x509.load_pem_x509_csr(pem.encode("ascii")).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    return pem_of_csr_der(der.replace(old, new))


def spki_sha256(key: SigningKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


PRIME256V1_OID_DER = bytes.fromhex("06082a8648ce3d030107")


@dataclass
class Scene:
    """One device, one authority's nonce codec, one moment: the inputs of ``prepare`` and ``judge``."""

    codec: NonceCodec = field(default_factory=codec)
    identity: SoftwareRootOfTrust = field(default_factory=SoftwareRootOfTrust.generate)
    limits: Limits = field(default_factory=Limits)
    now: dt.datetime = NOW

    @property
    def device_id(self) -> str:
        return device_id_for(self.identity.public_key())

    def nonce(self, device_id: str | None = None, at: dt.datetime | None = None) -> str:
        return self.codec.issue(device_id or self.device_id, at or self.now).text

    def request(
        self,
        *,
        nonce: str | None = None,
        csr_key: SigningKey | None = None,
        csr: str | None = None,
        bound_key_sha256: str | None = None,
        measurements: tuple[Measurement, ...] = SOFTWARE,
        signer: SoftwareRootOfTrust | None = None,
    ) -> EnrollmentRequest:
        """Evidence signed by ``signer`` (the device's identity by default) over whatever it is told."""
        key = csr_key or ec.generate_private_key(ec.SECP256R1())
        evidence = Evidence(
            device_id=self.device_id,
            nonce=nonce or self.nonce(),
            csr_key_sha256=bound_key_sha256 or spki_sha256(key),
            measurements=measurements,
        )
        return EnrollmentRequest(
            evidence=evidence,
            signature=(signer or self.identity).sign(evidence.to_be_signed()),
            csr=csr or csr_pem(key, self.device_id),
        )

    def prepare(self, request: EnrollmentRequest) -> PreparedEnrollment:
        return attestation.prepare(request, self.codec, self.now, self.limits)

    def standing(
        self, *, revoked: bool = False, key: ec.EllipticCurvePublicKey | None = None
    ) -> DeviceStanding:
        return DeviceStanding(
            device_id=self.device_id,
            tenant_id="tenant-1",
            identity_key=key or self.identity.public_key(),
            revoked=revoked,
        )


def policy_of(*measurements: Measurement, floors: dict[str, str] | None = None) -> ReferencePolicy:
    return ReferencePolicy(
        references=frozenset((m.name, m.version, m.sha256) for m in measurements), floors=floors or {}
    )


HEALTHY_POLICY = policy_of(AGENT, APP)


# ---------------------------------------------------------------------------------------------- nonces


def test_an_issued_nonce_opens_for_its_device_and_tells_its_expiry_and_random_part() -> None:
    nonces = codec()
    device_id = new_device_id()
    issued = nonces.issue(device_id, NOW, random=bytes(range(16)))
    opened = nonces.open(issued.text, device_id, NOW)
    assert opened == issued
    assert opened.nonce_id == bytes(range(16)).hex()
    assert opened.device_id == device_id
    assert opened.expires_at == NOW + TTL
    assert len(issued.text) == 98
    assert WIRE_NONCE.match(issued.text)


def test_two_nonces_for_the_same_device_and_moment_differ() -> None:
    nonces = codec()
    device_id = new_device_id()
    first, second = nonces.issue(device_id, NOW), nonces.issue(device_id, NOW)
    assert first.text != second.text
    assert first.nonce_id != second.nonce_id


def test_a_nonce_key_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NonceCodec(bytes(31), TTL)


def test_the_expiry_drops_sub_second_precision_so_it_never_outlives_the_ttl() -> None:
    issued = codec().issue(new_device_id(), NOW + dt.timedelta(microseconds=999_999))
    assert issued.expires_at == NOW + TTL
    assert issued.expires_at.microsecond == 0


@pytest.mark.parametrize(
    ("seconds_after_issue", "accepted"),
    [(0, True), (1, True), (119, True), (120, False), (121, False), (86_400, False)],
)
def test_a_nonce_is_accepted_until_its_expiry_and_refused_from_that_second_on(
    seconds_after_issue: int, accepted: bool
) -> None:
    nonces = codec()
    device_id = new_device_id()
    issued = nonces.issue(device_id, NOW)
    later = NOW + dt.timedelta(seconds=seconds_after_issue)
    if accepted:
        assert nonces.open(issued.text, device_id, later).nonce_id == issued.nonce_id
    else:
        assert refusal_code(lambda: nonces.open(issued.text, device_id, later)) == "nonce_expired"


def test_a_nonce_issued_to_another_device_is_refused() -> None:
    nonces = codec()
    issued = nonces.issue(new_device_id(), NOW)
    assert refusal_code(lambda: nonces.open(issued.text, new_device_id(), NOW)) == "nonce_wrong_device"


def test_a_nonce_of_another_authority_key_is_refused_as_not_issued_here() -> None:
    device_id = new_device_id()
    foreign = codec().issue(device_id, NOW)
    assert refusal_code(lambda: codec().open(foreign.text, device_id, NOW)) == "nonce_invalid"


def test_a_foreign_nonce_is_refused_even_when_it_names_the_device_and_has_expired() -> None:
    """The MAC is checked first: nothing in an unauthenticated nonce is believed or reported."""
    device_id = new_device_id()
    foreign = codec().issue(device_id, NOW - dt.timedelta(days=1))
    assert refusal_code(lambda: codec().open(foreign.text, new_device_id(), NOW)) == "nonce_invalid"


@pytest.mark.parametrize("index", range(NONCE_LENGTH_BYTES))
def test_a_nonce_with_any_byte_tampered_is_refused(index: int) -> None:
    """Byte 0 is the format version (so the nonce is malformed); any other byte breaks the MAC."""
    nonces = codec()
    device_id = new_device_id()
    raw = bytearray(nonce_bytes(nonces.issue(device_id, NOW).text))
    raw[index] ^= 0x01
    expected = "nonce_malformed" if index == 0 else "nonce_invalid"
    assert refusal_code(lambda: nonces.open(nonce_text(bytes(raw)), device_id, NOW)) == expected


@given(index=st.integers(0, NONCE_LENGTH_BYTES - 1), mask=st.integers(1, 255))
def test_property_no_single_byte_change_of_a_nonce_is_accepted(index: int, mask: int) -> None:
    nonces = NonceCodec(b"k" * 32, TTL)
    device_id = "ab" * 32
    raw = bytearray(nonce_bytes(nonces.issue(device_id, NOW).text))
    raw[index] ^= mask
    with pytest.raises(AttestationRefused):
        nonces.open(nonce_text(bytes(raw)), device_id, NOW)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("A" * 16, id="too-short"),
        pytest.param("A" * 17, id="not-a-base64-length"),
        pytest.param("A" * 98, id="right-length-wrong-version"),
        pytest.param("A" * 200, id="too-long"),
        pytest.param("é" * 98, id="not-ascii"),
    ],
)
def test_text_that_is_no_nonce_of_this_format_is_refused_as_malformed(text: str) -> None:
    assert refusal_code(lambda: codec().open(text, new_device_id(), NOW)) == "nonce_malformed"


def test_a_nonce_one_byte_short_or_long_is_malformed() -> None:
    nonces = codec()
    device_id = new_device_id()
    raw = nonce_bytes(nonces.issue(device_id, NOW).text)
    for changed in (raw[:-1], raw + b"\x00"):
        assert refusal_code(lambda: nonces.open(nonce_text(changed), device_id, NOW)) == "nonce_malformed"  # noqa: B023


@settings(max_examples=200)
@given(device_id=device_ids, now=moments, random=st.binary(min_size=16, max_size=16))
def test_property_a_nonce_round_trips_for_any_device_id_and_moment(
    device_id: str, now: dt.datetime, random: bytes
) -> None:
    nonces = NonceCodec(b"n" * 32, TTL)
    issued = nonces.issue(device_id, now, random=random)
    assert WIRE_NONCE.match(issued.text), "every nonce passes the wire format's pattern"
    assert nonces.open(issued.text, device_id, now) == issued
    assert issued.nonce_id == random.hex()
    assert now < issued.expires_at <= now + TTL


@given(device_id=device_ids, other=device_ids)
def test_property_a_nonce_opens_for_its_own_device_only(device_id: str, other: str) -> None:
    nonces = NonceCodec(b"n" * 32, TTL)
    issued = nonces.issue(device_id, NOW)
    if other == device_id:
        assert nonces.open(issued.text, other, NOW) == issued
    else:
        assert refusal_code(lambda: nonces.open(issued.text, other, NOW)) == "nonce_wrong_device"


@given(text=st.text(max_size=300))
def test_property_any_text_is_refused_with_a_nonce_code_never_another_error(text: str) -> None:
    code = refusal_code(lambda: codec().open(text, "00" * 32, NOW))
    assert code in {"nonce_malformed", "nonce_invalid"}


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_accepts_what_the_agent_builds_and_returns_the_csr_key() -> None:
    scene = Scene()
    key = ec.generate_private_key(ec.SECP256R1())
    request = build_enrollment(scene.identity, scene.nonce(), build_csr(key, scene.device_id), SOFTWARE)
    prepared = scene.prepare(request)
    assert prepared.device_id == scene.device_id
    assert prepared.csr_public_key.public_numbers() == key.public_key().public_numbers()
    assert prepared.nonce.device_id == scene.device_id
    assert prepared.request is request


@dataclass(frozen=True)
class PrepareCase:
    build: Callable[[Scene], EnrollmentRequest]
    code: str
    limits: Limits = field(default_factory=Limits)


def _csr_signed_badly(scene: Scene) -> EnrollmentRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    good = csr_pem(key, scene.device_id)
    first = scene.device_id[0]
    other = "0" if first != "0" else "1"
    return scene.request(
        csr_key=key, csr=edited_csr(good, scene.device_id.encode(), (other + scene.device_id[1:]).encode())
    )


def _csr_on_unknown_curve(scene: Scene) -> EnrollmentRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    unknown_curve = PRIME256V1_OID_DER[:-1] + b"\x7f"
    return scene.request(csr_key=key, csr=edited_csr(csr_pem(key), PRIME256V1_OID_DER, unknown_curve))


PREPARE_REFUSALS = {
    "too-many-measurements": PrepareCase(
        lambda s: s.request(measurements=(AGENT, APP, measurement("extra", "1.0"))),
        "too_many_measurements",
        Limits(max_measurements=2),
    ),
    "nonce-expired": PrepareCase(lambda s: s.request(nonce=s.nonce(at=NOW - TTL)), "nonce_expired"),
    "nonce-of-another-device": PrepareCase(
        lambda s: s.request(nonce=s.nonce(device_id=new_device_id())), "nonce_wrong_device"
    ),
    "nonce-of-another-authority": PrepareCase(
        lambda s: s.request(nonce=codec().issue(s.device_id, NOW).text), "nonce_invalid"
    ),
    "nonce-garbage": PrepareCase(lambda s: s.request(nonce="A" * 40), "nonce_malformed"),
    "csr-too-large": PrepareCase(
        lambda s: s.request(csr=csr_pem(ec.generate_private_key(ec.SECP256R1())) + "\n" * 4096),
        "csr_too_large",
    ),
    "csr-not-pem": PrepareCase(lambda s: s.request(csr="not a certificate request"), "csr_malformed"),
    "csr-pem-of-garbage": PrepareCase(
        lambda s: s.request(
            csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        ),
        "csr_malformed",
    ),
    "csr-not-ascii": PrepareCase(lambda s: s.request(csr="ünïcødé"), "csr_malformed"),
    "csr-p384": PrepareCase(
        lambda s: s.request(csr_key=ec.generate_private_key(ec.SECP384R1())), "csr_key_unsupported"
    ),
    "csr-secp256k1": PrepareCase(
        lambda s: s.request(csr_key=ec.generate_private_key(ec.SECP256K1())), "csr_key_unsupported"
    ),
    "csr-rsa": PrepareCase(
        lambda s: s.request(csr_key=rsa.generate_private_key(65537, 2048)), "csr_key_unsupported"
    ),
    "csr-ed25519": PrepareCase(
        lambda s: s.request(csr_key=ed25519.Ed25519PrivateKey.generate()), "csr_key_unsupported"
    ),
    "csr-unknown-curve": PrepareCase(_csr_on_unknown_curve, "csr_key_unsupported"),
    "csr-bad-signature": PrepareCase(_csr_signed_badly, "csr_signature_invalid"),
    "csr-key-not-the-bound-one": PrepareCase(
        lambda s: s.request(bound_key_sha256=spki_sha256(ec.generate_private_key(ec.SECP256R1()))),
        "csr_key_mismatch",
    ),
}


@pytest.mark.parametrize("case", PREPARE_REFUSALS.values(), ids=PREPARE_REFUSALS.keys())
def test_prepare_refuses_each_bad_nonce_and_csr_with_its_code(case: PrepareCase) -> None:
    scene = Scene(limits=case.limits)
    request = case.build(scene)
    assert refusal_code(lambda: scene.prepare(request)) == case.code


def test_prepare_does_not_check_the_evidence_signature_that_needs_the_stored_key() -> None:
    scene = Scene()
    forged = scene.request(signer=SoftwareRootOfTrust.generate())
    assert scene.prepare(forged).device_id == scene.device_id


def test_prepare_counts_measurements_before_it_opens_the_nonce() -> None:
    """The cheapest bound first: a flood of measurements is refused without any MAC computed."""
    scene = Scene(limits=Limits(max_measurements=1))
    request = scene.request(nonce="A" * 40)
    assert refusal_code(lambda: scene.prepare(request)) == "too_many_measurements"


# ---------------------------------------------------------------------------------------------- judge


def test_judge_accepts_a_claimed_device_signing_known_software() -> None:
    scene = Scene()
    prepared = scene.prepare(scene.request())
    attestation.judge(prepared, scene.standing(), HEALTHY_POLICY)


@dataclass(frozen=True)
class JudgeCase:
    standing: Callable[[Scene], DeviceStanding | None]
    policy: ReferencePolicy
    code: str
    measurements: tuple[Measurement, ...] = SOFTWARE


def _other_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


JUDGE_REFUSALS = {
    "unclaimed": JudgeCase(lambda s: None, HEALTHY_POLICY, "device_unclaimed"),
    "signed-by-another-key": JudgeCase(
        lambda s: s.standing(key=_other_key()), HEALTHY_POLICY, "evidence_signature_invalid"
    ),
    "revoked": JudgeCase(lambda s: s.standing(revoked=True), HEALTHY_POLICY, "device_revoked"),
    "revoked-and-forged-reveals-only-the-forgery": JudgeCase(
        lambda s: s.standing(revoked=True, key=_other_key()), HEALTHY_POLICY, "evidence_signature_invalid"
    ),
    "no-reference-values": JudgeCase(lambda s: s.standing(), ReferencePolicy(), "measurement_unknown"),
    "tampered-image": JudgeCase(
        lambda s: s.standing(),
        HEALTHY_POLICY,
        "measurement_unknown",
        (AGENT, measurement("panel-monitor", "2.1.0", tampered=True)),
    ),
    "unregistered-component": JudgeCase(
        lambda s: s.standing(), HEALTHY_POLICY, "measurement_unknown", (AGENT, APP, measurement("miner", "1"))
    ),
    "below-floor": JudgeCase(
        lambda s: s.standing(),
        policy_of(AGENT, APP, floors={"panel-monitor": "2.2"}),
        "measurement_below_floor",
    ),
}


@pytest.mark.parametrize("case", JUDGE_REFUSALS.values(), ids=JUDGE_REFUSALS.keys())
def test_judge_refuses_each_bad_standing_and_measurement_with_its_code(case: JudgeCase) -> None:
    scene = Scene()
    prepared = scene.prepare(scene.request(measurements=case.measurements))
    standing = case.standing(scene)
    assert refusal_code(lambda: attestation.judge(prepared, standing, case.policy)) == case.code


def test_judge_checks_the_signature_over_the_evidence_as_sent_not_as_reordered() -> None:
    scene = Scene()
    request = scene.request()
    reordered = request.model_copy(
        update={"evidence": request.evidence.model_copy(update={"measurements": (APP, AGENT)})}
    )
    prepared = scene.prepare(reordered)
    code = refusal_code(lambda: attestation.judge(prepared, scene.standing(), HEALTHY_POLICY))
    assert code == "evidence_signature_invalid"


@pytest.mark.parametrize(
    ("version", "floor", "accepted"),
    [
        ("2.1.0", "2.1.0", True),
        ("2.1.0", "2.1", True),
        ("2.1", "2.1.0", True),
        ("2.1.0", "2.0.99", True),
        ("2.10.0", "2.9", True),
        ("2.1.0", "2.1.0.1", False),
        ("2.1.0", "2.1.1", False),
        ("2.1.0", "10", False),
        ("2.9", "2.10", False),
    ],
)
def test_check_measurement_compares_versions_numerically_with_the_floor(
    version: str, floor: str, accepted: bool
) -> None:
    reported = measurement("panel-monitor", version)
    policy = policy_of(reported, floors={"panel-monitor": floor})
    if accepted:
        attestation.check_measurement(reported, policy)
    else:
        code = refusal_code(lambda: attestation.check_measurement(reported, policy))
        assert code == "measurement_below_floor"


def test_check_measurement_needs_name_version_and_digest_to_match_one_reference_value() -> None:
    policy = policy_of(APP)
    attestation.check_measurement(APP, policy)
    mismatched = [
        Measurement(name="panel-monitor2", version=APP.version, sha256=APP.sha256),
        Measurement(name=APP.name, version="2.1.1", sha256=APP.sha256),
        Measurement(name=APP.name, version=APP.version, sha256=image_digest("panel-monitor", "9")),
        Measurement(name=APP.name, version="2.1", sha256=APP.sha256),
    ]
    for wrong in mismatched:
        assert refusal_code(lambda: attestation.check_measurement(wrong, policy)) == "measurement_unknown"  # noqa: B023


def test_a_floor_on_another_component_does_not_affect_this_one() -> None:
    attestation.check_measurement(APP, policy_of(APP, floors={"fleetward-agent": "99"}))


# ------------------------------------------------------------------------------------------ evidence bytes


def _evidence() -> Evidence:
    return Evidence(
        device_id="11" * 32,
        nonce="N" * 98,
        csr_key_sha256="22" * 32,
        measurements=SOFTWARE,
    )


def _spec_event_digest(m: Measurement) -> bytes:
    return hashlib.sha256(
        b"fleetward-measurement-v1\x00"
        + m.name.encode()
        + b"\x00"
        + m.version.encode()
        + b"\x00"
        + bytes.fromhex(m.sha256)
    ).digest()


def test_to_be_signed_is_the_documented_statement() -> None:
    """Recomputed here from the format in the docstring of ``wire/evidence.py``, not from the code."""
    evidence = _evidence()
    log = bytes(32)
    for m in SOFTWARE:
        log = hashlib.sha256(log + _spec_event_digest(m)).digest()
    expected = (
        b"fleetward-evidence-v1\x00"
        + bytes.fromhex("11" * 32)
        + hashlib.sha256(b"N" * 98).digest()
        + bytes.fromhex("22" * 32)
        + log
    )
    assert evidence.to_be_signed() == expected
    assert len(expected) == 22 + 4 * 32


def test_to_be_signed_is_stable_across_copies_and_a_json_round_trip() -> None:
    evidence = _evidence()
    again = Evidence.model_validate_json(evidence.model_dump_json())
    assert again.to_be_signed() == evidence.to_be_signed() == _evidence().to_be_signed()


EVIDENCE_CHANGES: dict[str, dict[str, object]] = {
    "device_id": {"device_id": "12" + "11" * 31},
    "nonce": {"nonce": "N" * 97 + "M"},
    "nonce-length": {"nonce": "N" * 99},
    "csr_key_sha256": {"csr_key_sha256": "22" * 31 + "23"},
    "measurement-name": {
        "measurements": (AGENT, Measurement(name="panel-monitoR", version="2.1.0", sha256=APP.sha256))
    },
    "measurement-version": {
        "measurements": (AGENT, Measurement(name=APP.name, version="2.1.1", sha256=APP.sha256))
    },
    "measurement-digest": {"measurements": (AGENT, measurement("panel-monitor", "2.1.0", tampered=True))},
    "measurement-order": {"measurements": (APP, AGENT)},
    "measurement-added": {"measurements": (AGENT, APP, APP)},
    "measurement-removed": {"measurements": (AGENT,)},
}


@pytest.mark.parametrize("change", EVIDENCE_CHANGES.values(), ids=EVIDENCE_CHANGES.keys())
def test_to_be_signed_binds_every_field_of_the_evidence(change: dict[str, object]) -> None:
    evidence = _evidence()
    changed = Evidence.model_validate({**evidence.model_dump(), **change})
    assert changed.to_be_signed() != evidence.to_be_signed()
    assert len(changed.to_be_signed()) == len(evidence.to_be_signed())


def test_the_name_version_boundary_is_unambiguous_in_a_measurement_digest() -> None:
    """``a.b`` + ``1`` and ``a`` + ``b.1``-like splits cannot collide: fields are separated by a zero byte."""
    one = Measurement(name="app1", version="2.3", sha256=APP.sha256)
    two = Measurement(name="app", version="12.3", sha256=APP.sha256)
    assert one.event_digest() != two.event_digest()


def test_the_measurement_log_digest_starts_from_zeros_and_is_order_sensitive() -> None:
    assert measurement_log_digest(()) == bytes(32)
    assert measurement_log_digest([AGENT, APP]) == measurement_log_digest((AGENT, APP))
    assert measurement_log_digest((AGENT, APP)) != measurement_log_digest((APP, AGENT))
    assert measurement_log_digest((AGENT,)) != measurement_log_digest((AGENT, AGENT))


measurements_strategy = st.builds(
    lambda name, version, digest: Measurement(name=name, version=version, sha256=digest.hex()),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,15}\Z"),
    st.lists(st.integers(0, 999), min_size=1, max_size=4).map(lambda parts: ".".join(map(str, parts))),
    st.binary(min_size=32, max_size=32),
)


@given(log=st.lists(measurements_strategy, min_size=2, max_size=6), data=st.data())
def test_property_swapping_two_different_measurements_changes_the_log_digest(
    log: list[Measurement], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(log) - 1))
    j = data.draw(st.integers(0, len(log) - 1))
    swapped = list(log)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    if log[i] == log[j]:
        assert measurement_log_digest(swapped) == measurement_log_digest(log)
    else:
        assert measurement_log_digest(swapped) != measurement_log_digest(log)


@given(log=st.lists(measurements_strategy, max_size=6))
def test_property_the_log_digest_extends_like_a_pcr(log: list[Measurement]) -> None:
    expected = bytes(32)
    for m in log:
        expected = hashlib.sha256(expected + _spec_event_digest(m)).digest()
    assert measurement_log_digest(log) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"format": "fleetward-evidence-v2"},
        {"device_id": "AB" * 32},
        {"device_id": "ab" * 31},
        {"nonce": "short"},
        {"nonce": "has spaces in it!"},
        {"csr_key_sha256": "zz" * 32},
        {"measurements": []},
        {"unexpected": "field"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_evidence_refuses_malformed_fields_and_unknown_ones(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Evidence.model_validate({**_evidence().model_dump(), **change})


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "", "version": "1", "sha256": "00" * 32},
        {"name": "-leading-dash", "version": "1", "sha256": "00" * 32},
        {"name": "app", "version": "01", "sha256": "00" * 32},
        {"name": "app", "version": "1.2.3.4.5", "sha256": "00" * 32},
        {"name": "app", "version": "1", "sha256": "00" * 31},
        {"name": "app", "version": "1", "sha256": "00" * 32, "signer": "me"},
    ],
)
def test_a_measurement_refuses_bad_names_versions_digests_and_unknown_fields(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Measurement.model_validate(fields)


def test_a_nonce_request_accepts_only_a_device_id() -> None:
    assert NonceRequest.model_validate({"device_id": "ab" * 32}).device_id == "ab" * 32
    for bad in ({}, {"device_id": "AB" * 32}, {"device_id": "ab" * 32, "x": 1}, {"device_id": 7}):
        with pytest.raises(ValidationError):
            NonceRequest.model_validate(bad)


# ---------------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0", (0, 0, 0, 0)),
        ("1", (1, 0, 0, 0)),
        ("1.4", (1, 4, 0, 0)),
        ("2.0.13", (2, 0, 13, 0)),
        ("22.11.0.7", (22, 11, 0, 7)),
        ("999999999.0.0.999999999", (999_999_999, 0, 0, 999_999_999)),
        ("10.0", (10, 0, 0, 0)),
    ],
)
def test_parse_version_reads_one_to_four_numbers_and_pads_with_zeros(
    text: str, parsed: tuple[int, int, int, int]
) -> None:
    assert parse_version(text) == parsed
    assert check_version(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "1.",
        ".1",
        "1..2",
        "01",
        "1.02",
        "1.2.3.4.5",
        "1000000000",
        "v1.2",
        "1.2-beta",
        "1.2+build",
        "1 .2",
        " 1.2",
        "1.2\n",
        "-1",
        "+1",
        "1,2",
        "١.٢",
        "1.2.a",
    ],
)
def test_parse_version_refuses_anything_but_plain_dotted_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="not 1 to 4"):
        parse_version(text)
    with pytest.raises(ValueError, match="not 1 to 4"):
        check_version(text)


def test_parse_version_refuses_a_non_string_with_type_error() -> None:
    with pytest.raises(TypeError):
        parse_version(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("1.9", "1.10"), ("1.2", "1.2.0.1"), ("0.999", "1"), ("2.0.13", "2.1"), ("9", "10")],
)
def test_versions_order_numerically_not_as_text(lower: str, higher: str) -> None:
    assert parse_version(lower) < parse_version(higher)


def test_missing_trailing_parts_count_as_zero() -> None:
    assert parse_version("1.2") == parse_version("1.2.0") == parse_version("1.2.0.0")


version_parts = st.lists(st.integers(0, 999_999_999), min_size=1, max_size=4)


def _padded(parts: list[int]) -> tuple[int, ...]:
    return tuple(parts) + (0,) * (4 - len(parts))


@given(parts=version_parts)
def test_property_formatting_then_parsing_a_version_gives_its_numbers(parts: list[int]) -> None:
    text = ".".join(map(str, parts))
    assert parse_version(text) == _padded(parts)


@given(a=version_parts, b=version_parts)
def test_property_version_order_is_the_order_of_the_padded_number_tuples(a: list[int], b: list[int]) -> None:
    left, right = parse_version(".".join(map(str, a))), parse_version(".".join(map(str, b)))
    assert (left < right) == (_padded(a) < _padded(b))
    assert (left == right) == (_padded(a) == _padded(b))


@given(parts=version_parts, data=st.data())
def test_property_a_leading_zero_on_any_part_is_refused(parts: list[int], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(parts) - 1))
    text = ".".join(("0" + str(p)) if i == index else str(p) for i, p in enumerate(parts))
    with pytest.raises(ValueError, match="leading zeros"):
        parse_version(text)


@given(text=st.text(max_size=50))
def test_property_parse_version_accepts_or_raises_value_error_never_anything_else(text: str) -> None:
    try:
        parsed = parse_version(text)
    except ValueError:
        return
    assert len(parsed) == 4
    assert all(0 <= part <= 999_999_999 for part in parsed)


# ---------------------------------------------------------------------------------------------- identity


def _spki(key: SigningKey, encoding: serialization.Encoding) -> bytes:
    return key.public_key().public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_device_id_is_the_sha256_of_the_der_subject_public_key_info() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    expected = hashlib.sha256(_spki(key, serialization.Encoding.DER)).hexdigest()
    assert device_id_for(key.public_key()) == expected == public_key_sha256(key.public_key())
    assert check_device_id(expected) == expected


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_load_public_key_accepts_p256_in_pem_and_der_as_bytes_or_text(
    encoding: serialization.Encoding,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    data = _spki(key, encoding)
    assert load_public_key(data).public_numbers() == key.public_key().public_numbers()
    if encoding is serialization.Encoding.PEM:
        assert load_public_key(data.decode("ascii")).public_numbers() == key.public_key().public_numbers()
        assert load_public_key(b"\n  " + data).public_numbers() == key.public_key().public_numbers()


NON_P256_KEYS: dict[str, Callable[[], SigningKey]] = {
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "brainpoolP256r1": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("make_key", NON_P256_KEYS.values(), ids=NON_P256_KEYS.keys())
@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_load_public_key_refuses_every_key_that_is_not_p256(
    make_key: Callable[[], SigningKey], encoding: serialization.Encoding
) -> None:
    with pytest.raises(ValueError, match="P-256"):
        load_public_key(_spki(make_key(), encoding))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "-----BEGIN PUBLIC KEY-----\né\n-----END PUBLIC KEY-----\n",
        bytes(91),
    ],
)
def test_load_public_key_refuses_what_is_no_subject_public_key_info(data: bytes | str) -> None:
    with pytest.raises(ValueError, match="not a valid"):
        load_public_key(data)


def test_load_public_key_refuses_a_p256_key_whose_curve_was_swapped_for_an_unknown_one() -> None:
    der = _spki(ec.generate_private_key(ec.SECP256R1()), serialization.Encoding.DER)
    with pytest.raises(ValueError, match="not a valid"):
        load_public_key(der.replace(PRIME256V1_OID_DER, PRIME256V1_OID_DER[:-1] + b"\x7f"))


def test_a_device_id_is_only_named_by_p256_identities() -> None:
    """``device_id_for`` hashes any EC key, but no non-P-256 key can become an identity to name."""
    with pytest.raises(ConfigurationError):
        SoftwareRootOfTrust(ec.generate_private_key(ec.SECP384R1()))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        load_public_key(_spki(p384, serialization.Encoding.DER))


@pytest.mark.parametrize(
    "text",
    ["", "ab" * 31, "ab" * 33, "AB" * 32, "zz" * 32, " " + "ab" * 32, "ab" * 32 + "\n", "ab" * 31 + "a"],
)
def test_check_device_id_refuses_anything_but_64_lower_case_hex(text: str) -> None:
    with pytest.raises(ValueError, match="64 lower-case"):
        check_device_id(text)


@given(raw=st.binary(min_size=32, max_size=32))
def test_property_every_sha256_in_lower_case_hex_is_a_well_formed_device_id(raw: bytes) -> None:
    assert check_device_id(raw.hex()) == raw.hex()
