"""The PKCS#11 root of trust against a real SoftHSM2 token: the key is made there, stays there, and enrolls.

Each test gets its own token in its own directory (a private ``SOFTHSM2_CONF``). The tests skip with the
reason when SoftHSM2 or python-pkcs11 is missing, and fail instead when ``FLEETWARD_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509 import load_pem_x509_certificate
from cryptography.x509.oid import NameOID

from fleetward.agent.enroll import EnrollmentClient
from fleetward.agent.rot import RootOfTrust, device_id_of
from fleetward.api import schemas
from fleetward.errors import ConfigurationError
from fleetward.server import BackgroundServer
from tests.conftest import REQUIRE_SERVICES, TenantSetup, healthy_software

try:
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    from fleetward.agent.pkcs11 import SOFTHSM2_MODULE, Pkcs11RootOfTrust, UserPin
except ImportError as missing:
    if REQUIRE_SERVICES:
        raise ImportError(f"python-pkcs11 is required (FLEETWARD_REQUIRE_SERVICES=1): {missing}") from None
    pytest.skip(f"python-pkcs11 is not installed ({missing})", allow_module_level=True)

PIN = "4711-correct"
SO_PIN = "so-secret-0815"
KEY = "fleetward-identity"


@dataclass(frozen=True)
class SoftToken:
    module: Path
    label: str
    pin: UserPin

    def open(self, key_label: str = KEY) -> Pkcs11RootOfTrust:
        return Pkcs11RootOfTrust.open_or_create(self.module, self.label, key_label, self.pin)

    def session(self, *, rw: bool = False) -> pkcs11.Session:
        token = pkcs11.lib(str(self.module)).get_token(token_label=self.label)
        return token.open(rw=rw, user_pin=self.pin.reveal())


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftToken]:
    """A fresh SoftHSM2 token; the module reads its configuration when initialised: finalised after."""
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM2_MODULE.is_file():
        reason = "SoftHSM2 is not installed (apt-get install softhsm2; scripts/setup does it)"
        if REQUIRE_SERVICES:
            pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    directory = tmp_path / "softhsm"
    (directory / "tokens").mkdir(parents=True)
    configuration = directory / "softhsm2.conf"
    configuration.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(configuration))
    label = "fleetward-test"
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
    )
    pkcs11.lib(str(SOFTHSM2_MODULE)).finalize()  # forget the previous test's configuration, if loaded
    yield SoftToken(SOFTHSM2_MODULE, label, UserPin(PIN))
    pkcs11.lib(str(SOFTHSM2_MODULE)).finalize()


# ---------------------------------------------------------------------------------- the key stays put


def test_the_identity_key_is_made_on_the_token_and_cannot_be_read_back(token: SoftToken) -> None:
    root: RootOfTrust = token.open()
    assert root.development_only is False
    with token.session() as session:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=KEY)
        assert private.key_type == KeyType.EC
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.ALWAYS_SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[Attribute.VALUE]
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=KEY)
        assert bytes(public[Attribute.EC_PARAMS]) == encode_named_curve_parameters("secp256r1")


def test_signatures_are_der_ecdsa_p256_sha256_and_verify_with_cryptography(token: SoftToken) -> None:
    root = token.open()
    key = root.public_key()
    assert isinstance(key.curve, ec.SECP256R1)
    signature = root.sign(b"fleetward-evidence-v1\x00 some statement")
    r, s = decode_dss_signature(signature)  # DER, not the token's raw r || s
    assert r > 0
    assert s > 0
    key.verify(signature, b"fleetward-evidence-v1\x00 some statement", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(signature, b"another statement", ec.ECDSA(hashes.SHA256()))


def test_reopening_the_token_finds_the_same_key_and_so_the_same_device_id(token: SoftToken) -> None:
    first = device_id_of(token.open())
    pkcs11.lib(str(token.module)).finalize()  # as a restarted agent would: the module loads afresh
    again = token.open()
    assert device_id_of(again) == first
    with token.session() as session:
        assert len(list(session.get_objects({Attribute.LABEL: KEY}))) == 2  # one pair, not two
    data = b"after the restart"
    again.public_key().verify(again.sign(data), data, ec.ECDSA(hashes.SHA256()))


def test_two_key_labels_are_two_identities(token: SoftToken) -> None:
    assert device_id_of(token.open("one")) != device_id_of(token.open("two"))


def test_signing_from_several_threads_at_once_is_serialized_and_every_signature_verifies(
    token: SoftToken,
) -> None:
    root = token.open()
    messages = [f"message {index}".encode() for index in range(30)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        signatures = list(pool.map(root.sign, messages))  # an error in a thread is raised here
    for message, signature in zip(messages, signatures, strict=True):
        root.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


# ------------------------------------------------------------------------- refusals an operator can act on


def test_a_wrong_pin_is_refused_clearly_and_the_pin_appears_nowhere(token: SoftToken) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Pkcs11RootOfTrust.open_or_create(token.module, token.label, KEY, UserPin("0000-wrong"))
    assert refused.value.code == "pkcs11_pin_incorrect"
    assert "refused the PIN" in refused.value.message
    assert "0000-wrong" not in str(refused.value)
    assert "0000-wrong" not in repr(refused.value)


def test_a_missing_module_is_a_configuration_error(tmp_path: Path, token: SoftToken) -> None:
    with pytest.raises(ConfigurationError) as missing:
        Pkcs11RootOfTrust.open_or_create(tmp_path / "nope.so", token.label, KEY, token.pin)
    assert missing.value.code == "pkcs11_module_missing"
    not_a_module = tmp_path / "garbage.so"
    not_a_module.write_bytes(b"not an ELF file")
    with pytest.raises(ConfigurationError) as unloadable:
        Pkcs11RootOfTrust.open_or_create(not_a_module, token.label, KEY, token.pin)
    assert unloadable.value.code == "pkcs11_module_missing"
    assert "cannot be loaded" in unloadable.value.message


def test_an_unknown_token_label_is_refused_naming_the_tokens_there(token: SoftToken) -> None:
    with pytest.raises(ConfigurationError) as missing:
        Pkcs11RootOfTrust.open_or_create(token.module, "no-such-token", KEY, token.pin)
    assert missing.value.code == "pkcs11_token_not_found"
    assert "'no-such-token'" in missing.value.message
    assert token.label in missing.value.message


P256 = {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}
P384 = {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")}
EXPORTABLE = {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}


@pytest.mark.parametrize(
    ("label", "key_type", "public", "private", "code"),
    [
        ("rsa", KeyType.RSA, {}, {}, "pkcs11_key_wrong_type"),
        ("p384", KeyType.EC, P384, {}, "pkcs11_key_wrong_type"),
        ("exportable", KeyType.EC, P256, EXPORTABLE, "pkcs11_key_extractable"),
    ],
)
def test_a_key_that_is_not_a_sensitive_p256_pair_is_refused(
    token: SoftToken,
    label: str,
    key_type: KeyType,
    public: dict[Attribute, object],
    private: dict[Attribute, object],
    code: str,
) -> None:
    with token.session(rw=True) as session:  # made by someone else, under the label the agent will ask for
        session.generate_keypair(
            key_type,
            2048 if key_type is KeyType.RSA else None,
            store=True,
            label=label,
            public_template=public,
            private_template=private,
        )
    with pytest.raises(ConfigurationError) as refused:
        token.open(label)
    assert refused.value.code == code
    assert repr(label) in refused.value.message


def test_half_a_key_pair_is_refused(token: SoftToken) -> None:
    token.open("half")
    with token.session(rw=True) as session:
        session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="half").destroy()
    with pytest.raises(ConfigurationError) as refused:
        token.open("half")
    assert refused.value.code == "pkcs11_key_wrong_type"
    assert "not a key pair" in refused.value.message


def test_a_key_replaced_under_the_same_label_signs_nothing_for_the_old_identity(token: SoftToken) -> None:
    root = token.open()
    with token.session(rw=True) as session:
        for item in list(session.get_objects({Attribute.LABEL: KEY})):
            item.destroy()
    token.open()  # someone made a new pair under the label
    with pytest.raises(ConfigurationError) as changed:
        root.sign(b"evidence")
    assert changed.value.code == "pkcs11_key_changed"


# ---------------------------------------------------------------------------------------------- the PIN


def test_the_pin_is_in_no_repr(token: SoftToken) -> None:
    root = token.open()
    assert PIN not in repr(root)
    assert PIN not in repr(token.pin)
    assert PIN not in str(token.pin)
    assert PIN not in repr(token)  # a dataclass holding the PIN shows the PIN's own repr


def test_the_pin_comes_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETWARD_PKCS11_PIN", "from-the-environment")
    assert UserPin.from_environment().reveal() == "from-the-environment"
    monkeypatch.delenv("FLEETWARD_PKCS11_PIN")
    with pytest.raises(ConfigurationError) as missing:
        UserPin.from_environment()
    assert missing.value.code == "pkcs11_pin_missing"
    assert "$FLEETWARD_PKCS11_PIN" in missing.value.message


def test_the_pin_comes_from_a_private_file_and_a_readable_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("from-a-file\n")
    path.chmod(0o600)
    assert UserPin.from_file(path).reveal() == "from-a-file"
    path.chmod(0o644)
    with pytest.raises(ConfigurationError) as exposed:
        UserPin.from_file(path)
    assert exposed.value.code == "pkcs11_pin_exposed"
    assert "from-a-file" not in exposed.value.message
    with pytest.raises(ConfigurationError) as missing:
        UserPin.from_file(tmp_path / "absent")
    assert missing.value.code == "pkcs11_pin_missing"


# -------------------------------------------------------------------------- enrollment through the authority


def test_a_device_with_a_pkcs11_root_of_trust_enrolls_through_the_real_authority(
    token: SoftToken, server: BackgroundServer, tenant: TenantSetup
) -> None:
    root = token.open()
    pem = root.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claimed = tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/claim",
        schemas.DeviceClaim(
            devices=[schemas.DeviceClaimItem(device_id=device_id_of(root), public_key=pem.decode())],
            group_id=tenant.groups["Field Test"].id,
        ),
        schemas.ClaimResponse,
    )
    assert [result.outcome for result in claimed.results] == ["claimed"]

    async def enroll() -> str:
        async with (
            httpx.AsyncClient(timeout=30) as http,
            EnrollmentClient(server.url, root, http=http) as client,
        ):
            credential = await client.enroll(healthy_software())
            return credential.issued.certificate

    certificate = load_pem_x509_certificate(asyncio.run(enroll()).encode())
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id_of(root)
    assert [event.code for event in tenant.events(kind="attestation")] == ["certificate_issued"]
