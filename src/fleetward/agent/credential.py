"""The operational credential on disk: one file, replaced atomically, never half-written.

The key, the certificate and its chain live in one PEM file of mode 0600, so that renewal replaces them
together with one ``rename``: a reader (the hub link, the agent after a reboot) sees the old pair or the new
pair, never a key of one and the certificate of the other. The file reads as it is with
``ssl.SSLContext.load_cert_chain(path)``, which skips the comment lines before the first PEM block::

    # fleetward operational credential v1
    # device-id: 3f9a…
    # tenant-id: 5c1e…
    # serial: 7a2b…
    # renew-after: 2026-01-01T12:00:00+00:00
    -----BEGIN PRIVATE KEY-----            the operational key (PKCS#8)
    -----BEGIN CERTIFICATE-----            the operational certificate
    -----BEGIN CERTIFICATE-----            the issuing CA, then the root (the chain the authority sent)

A new credential is written to a temporary file in the same directory (created 0600, written, ``fsync``),
renamed over the old one, and the directory is ``fsync``-ed. A crash before the rename leaves the old file
whole and a temporary file that the next save removes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from fleetward.agent.config import sync_directory
from fleetward.agent.enroll import OperationalCredential
from fleetward.errors import ConfigurationError
from fleetward.wire.evidence import EnrollmentResponse

FORMAT_LINE = "# fleetward operational credential v1"
#: Far above a key and three certificates (about 3 KiB); a larger file is not one of ours.
MAX_CREDENTIAL_BYTES = 64 * 1024

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\n.+?\n-----END \1-----\n?", re.DOTALL)
_HEADER_FIELDS = ("device-id", "tenant-id", "serial", "renew-after")


def encode_credential(credential: OperationalCredential) -> bytes:
    """The file's bytes for ``credential``."""
    issued = credential.issued
    header = [
        FORMAT_LINE,
        f"# device-id: {issued.device_id}",
        f"# tenant-id: {issued.tenant_id}",
        f"# serial: {issued.serial}",
        f"# renew-after: {issued.renew_after.isoformat()}",
    ]
    blocks = [credential.key_pem().decode("ascii"), issued.certificate, *issued.chain]
    return ("\n".join(header) + "\n" + "".join(block.strip() + "\n" for block in blocks)).encode("ascii")


def decode_credential(data: bytes, origin: str = "the credential") -> OperationalCredential:
    """The credential in ``data``, or :class:`ConfigurationError` saying why the file is not one."""

    def refuse(why: str) -> ConfigurationError:
        return ConfigurationError(f"{origin} is unusable: {why}", code="credential_unusable")

    if len(data) > MAX_CREDENTIAL_BYTES:
        raise refuse(f"more than {MAX_CREDENTIAL_BYTES} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise refuse("not ASCII") from None
    lines = text.splitlines()
    if not lines or lines[0] != FORMAT_LINE:
        raise refuse("not a fleetward credential file")
    header: dict[str, str] = {}
    for line in lines[1:]:
        if not line.startswith("# "):
            break
        name, _, value = line[2:].partition(": ")
        header[name] = value
    if missing := [name for name in _HEADER_FIELDS if not header.get(name)]:
        raise refuse(f"the header lacks {', '.join(missing)}")
    blocks = [(match.group(1), match.group(0).strip() + "\n") for match in _PEM_BLOCK.finditer(text)]
    kinds = [kind for kind, _block in blocks]
    if len(kinds) < 2 or kinds[0] != "PRIVATE KEY" or any(kind != "CERTIFICATE" for kind in kinds[1:]):
        raise refuse("it must hold a private key, then the certificate and its chain")
    try:
        key = serialization.load_pem_private_key(blocks[0][1].encode("ascii"), password=None)
        certificate = x509.load_pem_x509_certificate(blocks[1][1].encode("ascii"))
        renew_after = dt.datetime.fromisoformat(header["renew-after"])
    except ValueError:
        raise refuse("a PEM block or the renewal time does not parse") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise refuse("the key is not an EC key")
    if key.public_key() != certificate.public_key():
        raise refuse("the key does not match the certificate")
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in common_names] != [header["device-id"]]:
        raise refuse("the certificate names another device")
    if f"{certificate.serial_number:x}" != header["serial"]:
        raise refuse("the certificate has another serial")
    try:
        issued = EnrollmentResponse(
            device_id=header["device-id"],
            tenant_id=header["tenant-id"],
            serial=header["serial"],
            certificate=blocks[1][1],
            chain=[block for _kind, block in blocks[2:]],
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            renew_after=renew_after,
        )
    except ValidationError:
        raise refuse("the header does not validate") from None
    if issued.renew_after.tzinfo is None:
        raise refuse("the renewal time has no time zone")
    return OperationalCredential(key=key, issued=issued)


class StagedCredential:
    """A credential written and synced to a temporary file, not yet in place (see :meth:`commit`)."""

    def __init__(self, temporary: Path, target: Path) -> None:
        self.temporary = temporary
        self._target = target

    def commit(self) -> None:
        """Put the credential in place (one atomic rename), then make the rename durable."""
        os.replace(self.temporary, self._target)
        sync_directory(self._target.parent)

    def discard(self) -> None:
        self.temporary.unlink(missing_ok=True)


class CredentialFile:
    """Where the agent keeps its operational credential; the directory should belong to the agent alone."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> OperationalCredential | None:
        """The stored credential, or ``None`` if there is none yet.

        Raises :class:`ConfigurationError` when the file is unreadable, not a whole credential, or readable
        by others (its key may have leaked: a new one is needed).
        """
        try:
            with self.path.open("rb") as handle:
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                data = handle.read(MAX_CREDENTIAL_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ConfigurationError(
                f"cannot read the credential {self.path}: {type(error).__name__}", code="credential_unusable"
            ) from None
        if mode & 0o077:
            raise ConfigurationError(
                f"the credential {self.path} is readable by others (mode {mode:o})", code="credential_exposed"
            )
        return decode_credential(data, str(self.path))

    def stage(self, credential: OperationalCredential) -> StagedCredential:
        """Write ``credential`` to a temporary file beside the target (0600, synced); nothing replaced yet."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_stale()
        temporary = directory / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(encode_credential(credential))
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return StagedCredential(temporary, self.path)

    def save(self, credential: OperationalCredential) -> None:
        """Replace the stored credential with ``credential``, all at once."""
        staged = self.stage(credential)
        try:
            staged.commit()
        except BaseException:
            staged.discard()
            raise

    def _remove_stale(self) -> None:
        """Temporary files a crash left behind (one renewer writes this file: none is in progress)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
