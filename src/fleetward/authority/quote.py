"""TPM 2.0 quotes read in pure Python: the marshalled ``TPMS_ATTEST`` of a TPM2_Quote, and nothing else.

The cloud does not depend on a TSS: this module reads the structure with :mod:`struct`, as the TPM 2.0
Library specification (part 2, "Structures") lays it out. Every integer is big-endian::

    TPMS_ATTEST
      magic            UINT32     TPM_GENERATED_VALUE, 0xff544347: the TPM made this structure
      type             UINT16     TPM_ST_ATTEST_QUOTE, 0x8018
      qualifiedSigner  TPM2B_NAME       UINT16 size || name of the signing key
      extraData        TPM2B_DATA       UINT16 size || the qualifying data the caller gave the quote
      clockInfo        TPMS_CLOCK_INFO  clock UINT64, resetCount UINT32, restartCount UINT32, safe BYTE
      firmwareVersion  UINT64
      attested         TPMS_QUOTE_INFO
        pcrSelect      TPML_PCR_SELECTION  count UINT32, then count times:
                                           hash UINT16, sizeofSelect BYTE, pcrSelect[sizeofSelect]
        pcrDigest      TPM2B_DIGEST        UINT16 size || hash of the selected PCR values, in order

:func:`parse_quote` refuses anything else, trailing bytes included, with :class:`QuoteMalformed`. What the
fields must *be* (the qualifying data, the PCR selection, the digest) is for ``attestation.py`` to judge.
The reset and restart counters of a quote by an owner-hierarchy key are obfuscated by the TPM, so they
are read but mean nothing here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fleetward.wire.evidence import MAX_ATTEST_BYTES

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B

#: Sizes the specification allows: a name is a 2-byte algorithm and a digest of at most 64 bytes (or a
#: 4-byte handle); qualifying data and digests are at most one SHA-512; a TPM has at most 16 banks
#: (``HASH_COUNT``) of at most 32 PCRs (``PCR_SELECT_MAX`` 4 bytes) here.
MAX_NAME_BYTES = 2 + 64
MAX_DIGEST_BYTES = 64
MAX_BANKS = 16
MAX_SELECT_BYTES = 4


class QuoteMalformed(ValueError):
    """The bytes are not the ``TPMS_ATTEST`` of a quote; the message says where they fail."""


@dataclass(frozen=True)
class PcrSelection:
    """The PCRs of one bank that a quote covers."""

    hash_alg: int
    pcrs: frozenset[int]


@dataclass(frozen=True)
class Quote:
    """A parsed quote. Nothing in it is trusted until its signature verifies."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selections: tuple[PcrSelection, ...]
    pcr_digest: bytes

    def marshal(self) -> bytes:
        """The ``TPMS_ATTEST`` bytes of this quote (the inverse of :func:`parse_quote`)."""
        selections = b"".join(
            struct.pack(">HB", selection.hash_alg, _select_size(selection.pcrs))
            + _select_bitmap(selection.pcrs)
            for selection in self.pcr_selections
        )
        return (
            struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
            + _sized(self.qualified_signer)
            + _sized(self.extra_data)
            + struct.pack(
                ">QIIBQ",
                self.clock,
                self.reset_count,
                self.restart_count,
                int(self.safe),
                self.firmware_version,
            )
            + struct.pack(">I", len(self.pcr_selections))
            + selections
            + _sized(self.pcr_digest)
        )


def parse_quote(data: bytes) -> Quote:
    """Read the ``TPMS_ATTEST`` of a TPM2_Quote, or raise :class:`QuoteMalformed`."""
    if not isinstance(data, bytes):
        raise TypeError(f"a TPMS_ATTEST is bytes, not {type(data).__name__}")
    if len(data) > MAX_ATTEST_BYTES:
        raise QuoteMalformed(f"is {len(data)} bytes; a quote is at most {MAX_ATTEST_BYTES}")
    reader = _Reader(data)
    magic = reader.unpack(">I", "magic")
    if magic != TPM_GENERATED_VALUE:
        raise QuoteMalformed(f"magic is {magic:#010x}, not TPM_GENERATED_VALUE: the TPM did not make it")
    kind = reader.unpack(">H", "type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise QuoteMalformed(f"type is {kind:#06x}, not TPM_ST_ATTEST_QUOTE (0x8018)")
    qualified_signer = reader.sized(MAX_NAME_BYTES, "qualifiedSigner")
    extra_data = reader.sized(MAX_DIGEST_BYTES, "extraData")
    clock = reader.unpack(">Q", "clockInfo.clock")
    reset_count = reader.unpack(">I", "clockInfo.resetCount")
    restart_count = reader.unpack(">I", "clockInfo.restartCount")
    safe = reader.unpack(">B", "clockInfo.safe")
    if safe > 1:
        raise QuoteMalformed(f"clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware_version = reader.unpack(">Q", "firmwareVersion")
    count = reader.unpack(">I", "pcrSelect.count")
    if count > MAX_BANKS:
        raise QuoteMalformed(f"pcrSelect.count is {count}; a TPM has at most {MAX_BANKS} banks")
    selections = []
    for index in range(count):
        hash_alg = reader.unpack(">H", f"pcrSelect[{index}].hash")
        bitmap = reader.sized(MAX_SELECT_BYTES, f"pcrSelect[{index}].pcrSelect", size_format=">B")
        selections.append(PcrSelection(hash_alg, _pcrs_of(bitmap)))
    pcr_digest = reader.sized(MAX_DIGEST_BYTES, "pcrDigest")
    if reader.remaining:
        raise QuoteMalformed(f"{reader.remaining} bytes follow the end of the structure")
    return Quote(
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware_version,
        pcr_selections=tuple(selections),
        pcr_digest=pcr_digest,
    )


class _Reader:
    """Reads fields from the front of a buffer; running out is :class:`QuoteMalformed`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise QuoteMalformed(f"truncated in {field}: {size} bytes needed, {self.remaining} left")
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def unpack(self, layout: str, field: str) -> int:
        (value,) = struct.unpack(layout, self.take(struct.calcsize(layout), field))
        return int(value)

    def sized(self, max_bytes: int, field: str, *, size_format: str = ">H") -> bytes:
        """A size then that many bytes (a TPM2B, or a PCR bitmap with its one-byte size)."""
        size = self.unpack(size_format, f"{field} size")
        if size > max_bytes:
            raise QuoteMalformed(f"{field} is {size} bytes; at most {max_bytes} are allowed")
        return self.take(size, field)


def _pcrs_of(bitmap: bytes) -> frozenset[int]:
    """PCR ``8 * i + j`` is selected when bit ``j`` of byte ``i`` is set."""
    return frozenset(
        8 * index + bit for index, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1
    )


def _select_size(pcrs: frozenset[int]) -> int:
    """Three bytes, as TPMs with 24 PCRs write it, or more for higher PCRs."""
    return max(3, (max(pcrs, default=0) // 8) + 1)


def _select_bitmap(pcrs: frozenset[int]) -> bytes:
    bitmap = bytearray(_select_size(pcrs))
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return bytes(bitmap)


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data
