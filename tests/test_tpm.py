"""The TPM 2.0 root of trust against a real software TPM (swtpm), and its quotes through the real authority.

Each test starts its own swtpm (two consecutive free ports, its own state directory, killed at teardown).
Without swtpm or tpm2-pytss the tests skip with the reason, and fail instead when
``FLEETWARD_REQUIRE_SERVICES=1`` (CI). The TPMS_ATTEST parser and the checks of a quote also have pure tests
that need no TPM: ``tests/test_tpm_quote.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from fleetward.agent.enroll import EnrollmentClient, build_csr, build_enrollment
from fleetward.agent.rot import QuotingRootOfTrust, device_id_of
from fleetward.api import schemas
from fleetward.authority import attestation
from fleetward.authority.quote import TPM_ALG_SHA256, PcrSelection, parse_quote
from fleetward.errors import ConfigurationError, TransportError
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import measurement
from fleetward.wire.evidence import (
    EnrollmentRequest,
    Evidence,
    Measurement,
    QuotablePcr,
    TpmQuoteEvidence,
    measurement_log_digest,
)
from tests.conftest import REQUIRE_SERVICES, TenantSetup, healthy_software

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPM2_HT, TPM2_RC, TPM2_RH, TPM2_ST, TPMA_OBJECT
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import (
        TPMS_SIGNATURE_ECC,
        TPMT_SIG_SCHEME,
        TPMT_SIGNATURE,
        TPMT_TK_HASHCHECK,
        TPMU_SIGNATURE,
    )

    from fleetward.agent.tpm import DEBUG_PCR, IDENTITY_KEY_ATTRIBUTES, TpmRootOfTrust, parse_tcti
except ImportError as missing:  # tpm2-pytss builds against the system's tpm2-tss: scripts/setup
    if REQUIRE_SERVICES:
        raise
    pytest.skip(
        f"tpm2-pytss is not installed ({missing}); scripts/setup installs it", allow_module_level=True
    )

SWTPM = shutil.which("swtpm")
ENROLL = "/v1/attestation/certificate"
NONCE = "/v1/attestation/nonce"
MINER = measurement("crypto-miner", "1.0")


def _require(found: object, reason: str) -> None:
    if found:
        return
    if REQUIRE_SERVICES:
        pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------ swtpm


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are free right now (swtpm's server and control channels)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("found no two consecutive free ports")


@dataclass
class Swtpm:
    """One swtpm process with its own state; ``restart`` keeps the state, as a reboot does."""

    state: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        assert SWTPM is not None
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / "swtpm.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    SWTPM,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state}",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"swtpm exited: {(self.state / 'swtpm.log').read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("swtpm did not listen within 10 s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def start_swtpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Swtpm]]:
    """Starts software TPMs on demand, each on its own ports and state directory; stops them all after."""
    _require(SWTPM, "swtpm is not installed; scripts/setup installs it")
    monkeypatch.setenv("TSS2_LOG", "all+none")  # the TSS logs the TPM's expected refusals on standard error
    started: list[Swtpm] = []

    def start() -> Swtpm:
        for _attempt in range(3):  # a port taken between the probe and swtpm's bind: try others
            tpm = Swtpm(tmp_path / f"swtpm-{len(started)}", _two_free_ports())
            started.append(tpm)
            try:
                tpm.start()
            except RuntimeError:
                tpm.stop()
                continue
            return tpm
        raise RuntimeError("swtpm did not start")

    yield start
    for tpm in started:
        tpm.stop()


@pytest.fixture
def tpm(start_swtpm: Callable[[], Swtpm]) -> Swtpm:
    return start_swtpm()


@pytest.fixture
def identity(tpm: Swtpm, tmp_path: Path) -> TpmRootOfTrust:
    return TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=DEBUG_PCR)


def launch(root: TpmRootOfTrust, log: tuple[Measurement, ...]) -> None:
    """What the agent's launcher does: reset the PCR, then extend it with each component in order."""
    root.reset_measurements()
    for item in log:
        root.extend(item)


def request_of(
    root: TpmRootOfTrust, nonce: str = "N" * 98, measurements: tuple[Measurement, ...] | None = None
) -> EnrollmentRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return build_enrollment(
        root, nonce, build_csr(key, device_id_of(root)), measurements or healthy_software()
    )


def transient_handles(tcti: str) -> list[int]:
    with ESAPI(tcti) as esapi:
        _more, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
        return [int(handle) for handle in data.data.handles]


# ------------------------------------------------------------------------------------------ the key


def test_the_identity_key_is_a_restricted_attestation_key_the_tpm_will_not_sign_a_digest_with(
    identity: TpmRootOfTrust, tpm: Swtpm, tmp_path: Path
) -> None:
    """The key file loads with tpm2-pytss' own TSSPrivKey (the tpm2-openssl format), and the TPM refuses
    TPM2_Sign over a digest it did not hash itself: the key signs quotes only."""
    assert isinstance(identity, QuotingRootOfTrust)
    assert not hasattr(identity, "sign")
    key = TSSPrivKey.from_pem((tmp_path / "identity.pem").read_bytes())
    attributes = key.public.publicArea.objectAttributes
    assert attributes == IDENTITY_KEY_ATTRIBUTES
    for attribute in (TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.SENSITIVEDATAORIGIN):
        assert attributes & attribute
    assert attributes & TPMA_OBJECT.RESTRICTED
    assert attributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert not attributes & TPMA_OBJECT.DECRYPT

    with ESAPI(tpm.tcti) as esapi:
        handle = key.load(esapi)  # under the same parent template: the same key
        try:
            loaded, _, _ = esapi.read_public(handle)
            assert bytes(loaded.publicArea.unique.ecc.x) == identity.public_key().public_numbers().x.to_bytes(
                32, "big"
            )
            with pytest.raises(TSS2_Exception) as refused:
                esapi.sign(
                    handle,
                    b"\x42" * 32,
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                    TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL),
                )
            assert refused.value.error == TPM2_RC.TICKET
        finally:
            esapi.flush_context(handle)


def test_the_key_file_is_private_and_holds_no_key_another_tpm_can_load(
    identity: TpmRootOfTrust, start_swtpm: Callable[[], Swtpm], tmp_path: Path
) -> None:
    key_file = tmp_path / "identity.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")

    other = start_swtpm()
    with pytest.raises(ConfigurationError) as refused:
        TpmRootOfTrust.load_or_create(other.tcti, key_file, pcr_index=DEBUG_PCR)
    assert refused.value.code == "tpm_refused"


def test_a_key_file_others_may_read_is_refused(identity: TpmRootOfTrust, tpm: Swtpm, tmp_path: Path) -> None:
    (tmp_path / "identity.pem").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem")


def test_the_identity_survives_reopening_and_a_restart_of_the_tpm(
    identity: TpmRootOfTrust, tpm: Swtpm, tmp_path: Path
) -> None:
    """The device id is the SHA-256 of the key's SubjectPublicKeyInfo, as for every root of trust."""
    spki = identity.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(spki) == 91
    assert device_id_of(identity) == hashlib.sha256(spki).hexdigest()
    reopened = TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=DEBUG_PCR)
    assert device_id_of(reopened) == device_id_of(identity)

    tpm.restart()
    rebooted = TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=DEBUG_PCR)
    assert device_id_of(rebooted) == device_id_of(identity)
    launch(rebooted, healthy_software())
    request = request_of(rebooted)
    identity.public_key().verify(
        request.signature, request.evidence.signed_message(), ec.ECDSA(hashes.SHA256())
    )


def test_a_tcti_is_read_as_tpm2_tools_write_it() -> None:
    assert parse_tcti("swtpm:host=127.0.0.1,port=2321") == ("swtpm", "host=127.0.0.1,port=2321")
    assert parse_tcti("device:/dev/tpmrm0") == ("device", "/dev/tpmrm0")
    assert parse_tcti("tabrmd") == ("tabrmd", None)


def test_a_swtpm_root_is_development_only_and_its_tcti_and_pcr_are_checked(
    identity: TpmRootOfTrust, tpm: Swtpm, tmp_path: Path
) -> None:
    assert identity.development_only
    for tcti in ("", ":host=127.0.0.1", " swtpm:port=1"):
        with pytest.raises(ConfigurationError):
            TpmRootOfTrust.load_or_create(tcti, tmp_path / "other.pem")
    with pytest.raises(ConfigurationError, match="PCR"):
        TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=17)  # type: ignore[arg-type]


def test_an_unreachable_tpm_is_a_retryable_transport_error(
    tmp_path: Path, start_swtpm: Callable[[], Swtpm]
) -> None:
    tpm = start_swtpm()
    root = TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=DEBUG_PCR)
    tpm.stop()
    with pytest.raises(TransportError) as unreachable:
        root.reset_measurements()
    assert unreachable.value.code == "tpm_unavailable"


# ------------------------------------------------------------------------------- measurements and quotes


@pytest.mark.parametrize("pcr", [16, 23])
def test_extending_the_pcr_folds_the_log_as_its_digest_does(
    pcr: QuotablePcr, tpm: Swtpm, tmp_path: Path
) -> None:
    root = TpmRootOfTrust.load_or_create(tpm.tcti, tmp_path / "identity.pem", pcr_index=pcr)
    agent, app = healthy_software()
    launch(root, (agent,))
    assert root.pcr_value() == measurement_log_digest((agent,))
    root.extend(app)
    assert root.pcr_value() == measurement_log_digest(healthy_software())
    root.reset_measurements()
    assert root.pcr_value() == bytes(32)


def test_a_quote_binds_the_statement_and_the_log_and_verifies_outside_the_tpm(
    identity: TpmRootOfTrust,
) -> None:
    launch(identity, healthy_software())
    request = request_of(identity)
    evidence = request.evidence
    assert isinstance(evidence, TpmQuoteEvidence)
    assert evidence.pcr_index == DEBUG_PCR

    quote = parse_quote(evidence.attest)
    assert quote.extra_data == evidence.statement_sha256()
    assert quote.pcr_selections == (PcrSelection(TPM_ALG_SHA256, frozenset({DEBUG_PCR})),)
    attestation.check_quote(evidence)
    identity.public_key().verify(request.signature, evidence.attest, ec.ECDSA(hashes.SHA256()))


def test_tpm2_checkquote_agrees_with_the_quote(identity: TpmRootOfTrust, tmp_path: Path) -> None:
    """A third party's verifier (tpm2-tools) accepts what fleetward accepts, and refuses a wrong PCR value."""
    checkquote = shutil.which("tpm2_checkquote")
    _require(checkquote, "tpm2_checkquote is not installed; scripts/setup installs tpm2-tools")
    assert checkquote is not None
    launch(identity, healthy_software())
    request = request_of(identity)
    assert isinstance(request.evidence, TpmQuoteEvidence)
    r, s = decode_dss_signature(request.signature)
    signature = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.ECDSA,
        signature=TPMU_SIGNATURE(
            ecdsa=TPMS_SIGNATURE_ECC(
                hash=TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"), signatureS=s.to_bytes(32, "big")
            )
        ),
    )
    (tmp_path / "key.pem").write_bytes(
        identity.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "attest").write_bytes(request.evidence.attest)
    (tmp_path / "signature").write_bytes(signature.marshal())

    def check(pcr_value: bytes) -> subprocess.CompletedProcess[str]:
        (tmp_path / "pcr").write_bytes(pcr_value)
        return subprocess.run(
            [
                checkquote,
                "--public",
                str(tmp_path / "key.pem"),
                "--message",
                str(tmp_path / "attest"),
                "--signature",
                str(tmp_path / "signature"),
                "--pcr",
                str(tmp_path / "pcr"),
                "--pcr-list",
                f"sha256:{DEBUG_PCR}",
                "--hash-algorithm",
                "sha256",
                "--qualification",
                request.evidence.statement_sha256().hex(),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "TSS2_LOG": "all+none"},
        )

    accepted = check(measurement_log_digest(healthy_software()))
    assert accepted.returncode == 0, accepted.stderr
    assert check(measurement_log_digest((MINER,))).returncode != 0


def test_no_transient_object_is_left_in_the_tpm_even_after_more_quotes_than_it_has_slots(
    identity: TpmRootOfTrust, tpm: Swtpm
) -> None:
    launch(identity, healthy_software())
    for _ in range(5):  # swtpm has three object slots: a leak would fail the fourth quote
        request_of(identity)
    assert transient_handles(tpm.tcti) == []


# --------------------------------------------------------------------------------- through the authority


def claim(tenant: TenantSetup, root: TpmRootOfTrust) -> None:
    pem = root.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claimed = tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/claim",
        schemas.DeviceClaim(
            devices=[schemas.DeviceClaimItem(device_id=device_id_of(root), public_key=pem.decode("ascii"))],
            group_id=tenant.groups["Field Test"].id,
        ),
        schemas.ClaimResponse,
    )
    assert [result.outcome for result in claimed.results] == ["claimed"]


def test_a_tpm_device_enrolls_through_the_real_authority_and_earns_a_certificate(
    server: BackgroundServer, tenant: TenantSetup, identity: TpmRootOfTrust
) -> None:
    claim(tenant, identity)
    launch(identity, healthy_software())

    async def enroll() -> x509.Certificate:
        async with httpx.AsyncClient(timeout=30) as http:
            client = EnrollmentClient(server.url, identity, http=http)
            credential = await client.enroll(healthy_software())
        return x509.load_pem_x509_certificate(credential.issued.certificate.encode("ascii"))

    certificate = asyncio.run(enroll())

    device_id = device_id_of(identity)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert [(event.code, event.device_id) for event in tenant.events(kind="attestation")] == [
        ("certificate_issued", device_id)
    ]
    assert len(tenant.certificates(device_id)) == 1


@dataclass
class TpmAttempt:
    """A claimed TPM device asking the real server for nonces and building requests, good or bad."""

    http: httpx.Client
    identity: TpmRootOfTrust
    start_swtpm: Callable[[], Swtpm]
    directory: Path

    def nonce(self) -> str:
        response = self.http.post(NONCE, json={"device_id": device_id_of(self.identity)})
        assert response.status_code == 200, response.text
        nonce: str = response.json()["nonce"]
        return nonce

    def request(self, measurements: tuple[Measurement, ...] | None = None) -> EnrollmentRequest:
        return request_of(self.identity, self.nonce(), measurements)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _edited(request: EnrollmentRequest, **changes: object) -> dict[str, object]:
    body = request.wire_dict()
    body["evidence"] = {**request.evidence.model_dump(mode="json"), **changes}
    return body


def _pcr_not_matching_the_log(a: TpmAttempt) -> dict[str, object]:
    """A component launched (and extended) that the log leaves out."""
    launch(a.identity, (*healthy_software(), MINER))
    return a.request(healthy_software()).wire_dict()


def _quote_over_another_nonce(a: TpmAttempt) -> dict[str, object]:
    """An earlier quote and its signature, replayed with the evidence of a fresh nonce."""
    launch(a.identity, healthy_software())
    old, new = a.request(), a.request()
    assert isinstance(old.evidence, TpmQuoteEvidence)
    body = _edited(new, attest=b64(old.evidence.attest))
    body["signature"] = b64(old.signature)
    return body


def _tampered_attest(a: TpmAttempt) -> dict[str, object]:
    """One bit of the TPMS_ATTEST's clock changed after signing."""
    launch(a.identity, healthy_software())
    request = a.request()
    assert isinstance(request.evidence, TpmQuoteEvidence)
    raw = bytearray(request.evidence.attest)
    raw[4 + 2 + 36 + 34] ^= 0x01
    return _edited(request, attest=b64(bytes(raw)))


def _statement_of(request: EnrollmentRequest) -> Evidence:
    evidence = request.evidence
    return Evidence(
        device_id=evidence.device_id,
        nonce=evidence.nonce,
        csr_key_sha256=evidence.csr_key_sha256,
        measurements=evidence.measurements,
    )


def _signed_by_another_tpm(a: TpmAttempt) -> dict[str, object]:
    """Another TPM, with the same software, quotes this device's statement with its own key."""
    other_tpm = a.start_swtpm()
    other = TpmRootOfTrust.load_or_create(other_tpm.tcti, a.directory / "other.pem", pcr_index=DEBUG_PCR)
    launch(other, healthy_software())
    honest = a.request()
    forged = other.attest(_statement_of(honest))
    return EnrollmentRequest(evidence=forged.evidence, signature=forged.signature, csr=honest.csr).wire_dict()


def _unknown_measurement(a: TpmAttempt) -> dict[str, object]:
    """The truth, quoted: a component that is no reference value ran."""
    log = (*healthy_software(), MINER)
    launch(a.identity, log)
    return a.request(log).wire_dict()


def _quote_of_another_pcr(a: TpmAttempt) -> dict[str, object]:
    launch(a.identity, healthy_software())
    return _edited(a.request(), pcr_index=23)


TPM_REFUSALS: dict[str, tuple[Callable[[TpmAttempt], dict[str, object]], str]] = {
    "pcr-does-not-match-the-log": (_pcr_not_matching_the_log, "quote_pcr_mismatch"),
    "quote-replayed-over-another-nonce": (_quote_over_another_nonce, "quote_nonce_mismatch"),
    "tpms-attest-tampered": (_tampered_attest, "evidence_signature_invalid"),
    "quote-signed-by-another-tpm": (_signed_by_another_tpm, "evidence_signature_invalid"),
    "log-with-an-unknown-measurement": (_unknown_measurement, "measurement_unknown"),
    "quote-of-another-pcr-than-named": (_quote_of_another_pcr, "quote_pcr_selection_invalid"),
}


@pytest.mark.parametrize(("build", "code"), TPM_REFUSALS.values(), ids=TPM_REFUSALS.keys())
def test_a_bad_tpm_enrollment_is_refused_with_its_code_and_recorded_in_its_tenant(
    build: Callable[[TpmAttempt], dict[str, object]],
    code: str,
    server: BackgroundServer,
    tenant: TenantSetup,
    identity: TpmRootOfTrust,
    start_swtpm: Callable[[], Swtpm],
    tmp_path: Path,
) -> None:
    claim(tenant, identity)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        body = build(TpmAttempt(http, identity, start_swtpm, tmp_path))
        response = http.post(ENROLL, json=body)

    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == code, response.text
    assert tenant.certificates() == []
    assert [(event.code, event.device_id) for event in tenant.events(kind="attestation")] == [
        (code, device_id_of(identity))
    ]
