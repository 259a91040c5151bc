"""TPM quote evidence without a TPM: the TPMS_ATTEST parser, the TPM evidence form, and prepare/judge on it.

Quotes here are built in pure Python (``Quote.marshal``) and signed with a software key, so every bad input
is a row of a table. ``tests/test_tpm.py`` does the same against a real software TPM.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetward.agent.enroll import build_csr, build_enrollment
from fleetward.agent.rot import QuotingRootOfTrust, SignedEvidence, SoftwareRootOfTrust, attest
from fleetward.authority import attestation
from fleetward.authority.attestation import DeviceStanding, ReferencePolicy
from fleetward.authority.nonces import NonceCodec
from fleetward.authority.quote import (
    TPM_ALG_SHA256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    PcrSelection,
    Quote,
    QuoteMalformed,
    parse_quote,
)
from fleetward.config import Limits
from fleetward.errors import AttestationRefused
from fleetward.sim.fleet import measurement
from fleetward.wire.evidence import (
    MAX_ATTEST_BYTES,
    EnrollmentRequest,
    Evidence,
    Measurement,
    QuotablePcr,
    TpmQuoteEvidence,
    measurement_log_digest,
)
from fleetward.wire.identity import device_id_for

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
AGENT = measurement("fleetward-agent", "1.4.0")
APP = measurement("panel-monitor", "2.1.0")
SOFTWARE = (AGENT, APP)
POLICY = ReferencePolicy(references=frozenset((m.name, m.version, m.sha256) for m in SOFTWARE))
TPM_ALG_SHA1 = 0x0004
SIGNATURE = base64.b64encode(b"\x30" * 70).decode(
    "ascii"
)  # the length of a DER signature; never verified here


def refusal_code(action: Callable[[], object]) -> str:
    with pytest.raises(AttestationRefused) as refused:
        action()
    return refused.value.code


def a_quote(**changes: object) -> Quote:
    """A well-formed quote of PCR 16 (what swtpm writes, down to the field sizes), with ``changes``."""
    quote = Quote(
        qualified_signer=b"\x00\x0b" + bytes(range(32)),
        extra_data=b"\x42" * 32,
        clock=123_456,
        reset_count=0x1CF5E3A6,
        restart_count=0xD98E4A33,
        safe=True,
        firmware_version=0x2019_0815_0016_3200,
        pcr_selections=(PcrSelection(TPM_ALG_SHA256, frozenset({16})),),
        pcr_digest=hashlib.sha256(b"pcr").digest(),
    )
    return replace(quote, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the parser


def test_a_quote_of_one_pcr_is_the_documented_145_bytes_and_parses_back() -> None:
    """Written by hand from TPM 2.0 part 2, not by ``marshal``: magic, type, name, data, clock, firmware…"""
    quote = a_quote()
    expected = (
        bytes.fromhex("ff5443478018")
        + b"\x00\x22"
        + quote.qualified_signer
        + b"\x00\x20"
        + quote.extra_data
        + struct.pack(">QIIB", 123_456, 0x1CF5E3A6, 0xD98E4A33, 1)
        + struct.pack(">Q", quote.firmware_version)
        + bytes.fromhex("00000001000b03000001")
        + b"\x00\x20"
        + quote.pcr_digest
    )
    assert len(expected) == 145
    assert quote.marshal() == expected
    assert parse_quote(expected) == quote


def test_the_pcr_bitmap_numbers_pcrs_from_the_low_bit_of_the_first_byte() -> None:
    for pcrs, bitmap in (({0}, "010000"), ({7, 8}, "800100"), ({16}, "000001"), ({23}, "000080")):
        selection = (PcrSelection(TPM_ALG_SHA256, frozenset(pcrs)),)
        raw = a_quote(pcr_selections=selection).marshal()
        assert bytes.fromhex("000b03" + bitmap) in raw
        assert parse_quote(raw).pcr_selections == selection


def _edit(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:offset] + value + raw[offset + len(value) :]


_SELECTION = 4 + 2 + 36 + 34 + 17 + 8  # where pcrSelect starts in a_quote()

MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "truncated-in-magic": lambda raw: raw[:3],
    "truncated-in-type": lambda raw: raw[:5],
    "truncated-in-qualified-signer": lambda raw: raw[:20],
    "truncated-in-clock-info": lambda raw: raw[:80],
    "truncated-in-pcr-selection": lambda raw: raw[: _SELECTION + 6],
    "truncated-in-pcr-digest": lambda raw: raw[:-1],
    "one-byte-too-many": lambda raw: raw + b"\x00",
    "oversized": lambda raw: raw + bytes(MAX_ATTEST_BYTES + 1 - len(raw)),
    "wrong-magic": _edit(0, b"\xff\x54\x43\x48"),
    "magic-of-zeros": _edit(0, bytes(4)),
    "type-certify-not-quote": _edit(4, b"\x80\x17"),
    "type-time-not-quote": _edit(4, b"\x80\x19"),
    "name-longer-than-any-digest": lambda raw: raw[:6] + b"\x00\x43" + bytes(67) + raw[42:],
    "extra-data-longer-than-sha512": lambda raw: raw[:42] + b"\x00\x41" + bytes(65) + raw[76:],
    "safe-neither-yes-nor-no": _edit(4 + 2 + 36 + 34 + 16, b"\x02"),
    "more-banks-than-a-tpm-has": _edit(_SELECTION, struct.pack(">I", 17)),
    "count-of-banks-beyond-the-data": _edit(_SELECTION, struct.pack(">I", 2)),
    "select-bitmap-of-five-bytes": _edit(_SELECTION + 6, b"\x05"),
    "pcr-digest-longer-than-sha512": lambda raw: raw[:-34] + b"\x00\x41" + bytes(65),
    "pcr-digest-size-beyond-the-data": lambda raw: raw[:-34] + b"\x00\x21" + raw[-32:],
}


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
def test_the_parser_refuses_each_malformed_tpms_attest(edit: Callable[[bytes], bytes]) -> None:
    with pytest.raises(QuoteMalformed):
        parse_quote(edit(a_quote().marshal()))


def test_every_strict_prefix_of_a_quote_is_refused_as_truncated() -> None:
    raw = a_quote().marshal()
    for length in range(len(raw)):
        with pytest.raises(QuoteMalformed, match="truncated"):
            parse_quote(raw[:length])


def test_the_parser_names_what_is_wrong() -> None:
    raw = a_quote().marshal()
    with pytest.raises(QuoteMalformed, match="TPM_GENERATED_VALUE"):
        parse_quote(MALFORMED["wrong-magic"](raw))
    with pytest.raises(QuoteMalformed, match="TPM_ST_ATTEST_QUOTE"):
        parse_quote(MALFORMED["type-certify-not-quote"](raw))
    with pytest.raises(QuoteMalformed, match="follow the end"):
        parse_quote(raw + b"\x00")


def test_the_parser_takes_bytes_only() -> None:
    with pytest.raises(TypeError):
        parse_quote(bytearray(a_quote().marshal()))  # type: ignore[arg-type]


quotes = st.builds(
    Quote,
    qualified_signer=st.binary(max_size=66),
    extra_data=st.binary(max_size=64),
    clock=st.integers(0, 2**64 - 1),
    reset_count=st.integers(0, 2**32 - 1),
    restart_count=st.integers(0, 2**32 - 1),
    safe=st.booleans(),
    firmware_version=st.integers(0, 2**64 - 1),
    pcr_selections=st.lists(
        st.builds(PcrSelection, st.integers(0, 0xFFFF), st.frozensets(st.integers(0, 31))), max_size=16
    ).map(tuple),
    pcr_digest=st.binary(max_size=64),
)


@given(quote=quotes)
def test_property_a_quote_round_trips_through_its_bytes(quote: Quote) -> None:
    assert parse_quote(quote.marshal()) == quote


@given(data=st.binary(max_size=2 * MAX_ATTEST_BYTES))
def test_property_any_bytes_parse_or_raise_quote_malformed_never_anything_else(data: bytes) -> None:
    with contextlib.suppress(QuoteMalformed):
        parse_quote(data)


@given(prefix=st.binary(max_size=200))
def test_property_bytes_after_the_magic_and_type_still_parse_or_raise_quote_malformed(prefix: bytes) -> None:
    with contextlib.suppress(QuoteMalformed):
        parse_quote(struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE) + prefix)


# ------------------------------------------------------------------------------------------ the wire form


def _statement(measurements: tuple[Measurement, ...] = SOFTWARE) -> Evidence:
    return Evidence(device_id="11" * 32, nonce="N" * 98, csr_key_sha256="22" * 32, measurements=measurements)


def test_the_tpm_form_states_the_same_150_bytes_as_v1() -> None:
    quoted = TpmQuoteEvidence.of(_statement(), 16, b"attest")
    assert quoted.to_be_signed() == _statement().to_be_signed()
    assert quoted.statement_sha256() == hashlib.sha256(_statement().to_be_signed()).digest()
    assert quoted.signed_message() == b"attest"
    assert _statement().signed_message() == _statement().to_be_signed()


def test_the_tpm_form_round_trips_through_json_with_the_attest_in_base64() -> None:
    quoted = TpmQuoteEvidence.of(_statement(), 23, b"\xff\x54\x43\x47")
    wire = quoted.model_dump(mode="json")
    assert wire["format"] == "fleetward-tpm-quote-v1"
    assert wire["pcr_index"] == 23
    assert wire["attest"] == "/1RDRw=="
    assert list(wire)[:5] == ["format", "device_id", "nonce", "csr_key_sha256", "measurements"]
    request = EnrollmentRequest(evidence=quoted, signature=b"\x30" * 70, csr="csr")
    again = EnrollmentRequest.model_validate_json(json.dumps(request.wire_dict()))
    assert again == request
    assert isinstance(again.evidence, TpmQuoteEvidence)


def test_v1_evidence_keeps_its_form_and_is_the_default_when_no_format_is_named() -> None:
    v1 = _statement().model_dump(mode="json")
    assert list(v1) == ["format", "device_id", "nonce", "csr_key_sha256", "measurements"]
    del v1["format"]
    request = EnrollmentRequest.model_validate({"evidence": v1, "signature": SIGNATURE, "csr": "c"})
    assert isinstance(request.evidence, Evidence)


def _tpm_wire(*, without: str | None = None, **changes: object) -> dict[str, object]:
    """A TPM enrollment body with ``changes`` to its evidence, and without the field ``without``."""
    evidence = {
        **TpmQuoteEvidence.of(_statement(), 16, a_quote().marshal()).model_dump(mode="json"),
        **changes,
    }
    evidence.pop(without or "", None)
    return {"evidence": evidence, "signature": SIGNATURE, "csr": "c"}


TPM_FORM_MALFORMED: dict[str, dict[str, object]] = {
    "pcr-not-resettable-by-applications": _tpm_wire(pcr_index=17),
    "pcr-zero": _tpm_wire(pcr_index=0),
    "pcr-as-text": _tpm_wire(pcr_index="16"),
    "no-pcr-index": _tpm_wire(without="pcr_index"),
    "no-attest": _tpm_wire(without="attest"),
    "attest-empty": _tpm_wire(attest=""),
    "attest-not-base64": _tpm_wire(attest="not*base64"),
    "attest-beyond-the-wire-ceiling": _tpm_wire(
        attest=base64.b64encode(bytes(MAX_ATTEST_BYTES + 1)).decode()
    ),
    "unknown-field": _tpm_wire(firmware="1.0"),
    "v1-with-a-quote": _tpm_wire(format="fleetward-evidence-v1"),
    "format-v2": _tpm_wire(format="fleetward-tpm-quote-v2"),
    "format-not-text": _tpm_wire(format=7),
}


@pytest.mark.parametrize("body", TPM_FORM_MALFORMED.values(), ids=TPM_FORM_MALFORMED.keys())
def test_the_tpm_form_refuses_malformed_fields_and_unknown_ones(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EnrollmentRequest.model_validate(body)


def test_a_tpm_form_at_the_wire_ceiling_parses() -> None:
    body = _tpm_wire(attest=base64.b64encode(bytes(MAX_ATTEST_BYTES)).decode())
    assert len(EnrollmentRequest.model_validate(body).evidence.signed_message()) == MAX_ATTEST_BYTES


# ------------------------------------------------------------------------------------------ a quoting root


@dataclass
class QuotingSoftwareRoot:
    """A stand-in for a TPM: a software key that signs quotes built in Python (never in production)."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    pcr_index: QuotablePcr = 16
    #: what the PCR holds; None: the log digest of the statement, as a truthful device's would
    pcr: bytes | None = None
    selections: tuple[PcrSelection, ...] | None = None
    extra_data: bytes | None = None
    development_only: bool = True

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def attest(self, statement: Evidence) -> SignedEvidence:
        pcr = self.pcr if self.pcr is not None else measurement_log_digest(statement.measurements)
        quote = a_quote(
            extra_data=self.extra_data if self.extra_data is not None else statement.statement_sha256(),
            pcr_selections=self.selections or (PcrSelection(TPM_ALG_SHA256, frozenset({self.pcr_index})),),
            pcr_digest=hashlib.sha256(pcr).digest(),
        )
        attest_bytes = quote.marshal()
        signature = self.key.sign(attest_bytes, ec.ECDSA(hashes.SHA256()))
        return SignedEvidence(TpmQuoteEvidence.of(statement, self.pcr_index, attest_bytes), signature)


def test_attest_quotes_with_a_quoting_root_and_signs_v1_with_any_other() -> None:
    quoting, signing = QuotingSoftwareRoot(), SoftwareRootOfTrust.generate()
    assert isinstance(quoting, QuotingRootOfTrust)
    assert not isinstance(signing, QuotingRootOfTrust)

    quoted = attest(quoting, _statement())
    signed = attest(signing, _statement())

    assert isinstance(quoted.evidence, TpmQuoteEvidence)
    quoting.public_key().verify(quoted.signature, quoted.evidence.attest, ec.ECDSA(hashes.SHA256()))
    assert signed.evidence == _statement()
    signing.public_key().verify(signed.signature, _statement().to_be_signed(), ec.ECDSA(hashes.SHA256()))


@dataclass
class TpmScene:
    """One quoting device and one authority: the inputs of ``prepare`` and ``judge`` for TPM evidence."""

    root: QuotingSoftwareRoot = field(default_factory=QuotingSoftwareRoot)
    codec: NonceCodec = field(
        default_factory=lambda: NonceCodec(secrets.token_bytes(32), dt.timedelta(seconds=120))
    )

    @property
    def device_id(self) -> str:
        return device_id_for(self.root.public_key())

    def request(self, measurements: tuple[Measurement, ...] = SOFTWARE) -> EnrollmentRequest:
        key = ec.generate_private_key(ec.SECP256R1())
        nonce = self.codec.issue(self.device_id, NOW).text
        return build_enrollment(self.root, nonce, build_csr(key, self.device_id), measurements)

    def standing(self, key: ec.EllipticCurvePublicKey | None = None) -> DeviceStanding:
        return DeviceStanding(self.device_id, "tenant-1", key or self.root.public_key(), revoked=False)

    def verdict(self, request: EnrollmentRequest, standing: DeviceStanding | None = None) -> None:
        prepared = attestation.prepare(request, self.codec, NOW, Limits())
        attestation.judge(prepared, standing or self.standing(), POLICY)


def test_a_truthful_quote_of_known_software_is_accepted() -> None:
    scene = TpmScene()
    request = scene.request()
    assert isinstance(request.evidence, TpmQuoteEvidence)
    scene.verdict(request)


def _with_evidence(request: EnrollmentRequest, **changes: object) -> EnrollmentRequest:
    return request.model_copy(update={"evidence": request.evidence.model_copy(update=changes)})


def _tampered(request: EnrollmentRequest, offset: int) -> EnrollmentRequest:
    assert isinstance(request.evidence, TpmQuoteEvidence)
    raw = bytearray(request.evidence.attest)
    raw[offset] ^= 0x01
    return _with_evidence(request, attest=bytes(raw))


def _truncated(scene: TpmScene) -> EnrollmentRequest:
    request = scene.request()
    return _with_evidence(request, attest=request.evidence.signed_message()[:-1])


def _quote_of_another_nonce(scene: TpmScene) -> EnrollmentRequest:
    """The quote and signature of one request, replayed with the evidence of a fresh nonce."""
    old, new = scene.request(), scene.request()
    assert isinstance(old.evidence, TpmQuoteEvidence)
    return _with_evidence(new, attest=old.evidence.attest).model_copy(update={"signature": old.signature})


def _v1_signature_on_a_quote(scene: TpmScene) -> EnrollmentRequest:
    request = scene.request()
    signature = scene.root.key.sign(request.evidence.to_be_signed(), ec.ECDSA(hashes.SHA256()))
    return request.model_copy(update={"signature": signature})


@dataclass(frozen=True)
class QuoteCase:
    build: Callable[[TpmScene], EnrollmentRequest]
    code: str
    root: Callable[[], QuotingSoftwareRoot] = QuotingSoftwareRoot


_OTHER_LOG_PCR = measurement_log_digest((AGENT, APP, measurement("crypto-miner", "1.0")))
_CLOCK_OFFSET = 4 + 2 + 36 + 34  # first byte of clockInfo.clock

QUOTE_REFUSALS: dict[str, QuoteCase] = {
    "attest-not-a-quote": QuoteCase(
        lambda s: _with_evidence(s.request(), attest=b"\x00" * 145), "quote_malformed"
    ),
    "attest-truncated": QuoteCase(_truncated, "quote_malformed"),
    "quote-of-two-pcrs": QuoteCase(
        lambda s: s.request(),
        "quote_pcr_selection_invalid",
        lambda: QuotingSoftwareRoot(selections=(PcrSelection(TPM_ALG_SHA256, frozenset({16, 23})),)),
    ),
    "quote-of-the-sha1-bank": QuoteCase(
        lambda s: s.request(),
        "quote_pcr_selection_invalid",
        lambda: QuotingSoftwareRoot(selections=(PcrSelection(TPM_ALG_SHA1, frozenset({16})),)),
    ),
    "quote-of-two-banks": QuoteCase(
        lambda s: s.request(),
        "quote_pcr_selection_invalid",
        lambda: QuotingSoftwareRoot(
            selections=(
                PcrSelection(TPM_ALG_SHA256, frozenset({16})),
                PcrSelection(TPM_ALG_SHA1, frozenset({16})),
            )
        ),
    ),
    "quote-of-no-pcr": QuoteCase(
        lambda s: s.request(),
        "quote_pcr_selection_invalid",
        lambda: QuotingSoftwareRoot(selections=(PcrSelection(TPM_ALG_SHA256, frozenset()),)),
    ),
    "quote-of-another-pcr-than-named": QuoteCase(
        lambda s: _with_evidence(s.request(), pcr_index=23), "quote_pcr_selection_invalid"
    ),
    "quote-over-another-nonce": QuoteCase(_quote_of_another_nonce, "quote_nonce_mismatch"),
    "quote-over-other-data": QuoteCase(
        lambda s: s.request(), "quote_nonce_mismatch", lambda: QuotingSoftwareRoot(extra_data=bytes(32))
    ),
    "log-edited-after-quoting": QuoteCase(
        lambda s: _with_evidence(s.request(), measurements=(APP, AGENT)), "quote_nonce_mismatch"
    ),
    "pcr-holds-another-log": QuoteCase(
        lambda s: s.request(), "quote_pcr_mismatch", lambda: QuotingSoftwareRoot(pcr=_OTHER_LOG_PCR)
    ),
    "pcr-never-extended": QuoteCase(
        lambda s: s.request(), "quote_pcr_mismatch", lambda: QuotingSoftwareRoot(pcr=bytes(32))
    ),
    "attest-tampered-in-the-clock": QuoteCase(
        lambda s: _tampered(s.request(), _CLOCK_OFFSET), "evidence_signature_invalid"
    ),
    "attest-tampered-in-the-signer-name": QuoteCase(
        lambda s: _tampered(s.request(), 10), "evidence_signature_invalid"
    ),
    "v1-signature-on-a-quote": QuoteCase(_v1_signature_on_a_quote, "evidence_signature_invalid"),
    "unknown-measurement-truthfully-quoted": QuoteCase(
        lambda s: s.request((AGENT, APP, measurement("crypto-miner", "1.0"))), "measurement_unknown"
    ),
}


@pytest.mark.parametrize("case", QUOTE_REFUSALS.values(), ids=QUOTE_REFUSALS.keys())
def test_each_bad_quote_is_refused_with_its_code(case: QuoteCase) -> None:
    scene = TpmScene(root=case.root())
    request = case.build(scene)
    assert refusal_code(lambda: scene.verdict(request)) == case.code


def test_a_quote_signed_by_another_key_is_refused_by_judge_with_the_stored_key() -> None:
    scene = TpmScene()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert (
        refusal_code(lambda: scene.verdict(scene.request(), scene.standing(other)))
        == "evidence_signature_invalid"
    )


def test_the_quote_is_checked_in_prepare_before_the_device_is_looked_up() -> None:
    """Malformed, misbound or mismatched quotes need no stored state: they never reach the store."""
    scene = TpmScene(root=QuotingSoftwareRoot(pcr=bytes(32)))
    request = scene.request()
    code = refusal_code(lambda: attestation.prepare(request, scene.codec, NOW, Limits()))
    assert code == "quote_pcr_mismatch"
