"""The pure core of a tenant's TUF image repository: roots, targets, product roles, snapshot, timestamp.

Everything here takes keys, signers, times and typed values and returns python-tuf ``Metadata`` objects or
signed bytes; the shell (``images.py``) keeps them. The shape of the repository (ADR 0015):

- ``root``: k-of-n offline keys (the server only ever sees their public halves). It names the online keys
  of ``targets``, ``snapshot`` and ``timestamp``, and the director's keys in
  ``unrecognized_fields[wire.updates.DIRECTOR_FIELD]``. Consistent snapshots are on.
- ``targets`` delegates to one role per product (``product-<id>``, paths ``<id>/*/*/*``, terminating), each
  with its own online key; a product role lists the product's images and deltas, and the tenant's security
  floors in ``unrecognized_fields[wire.updates.FLOORS_FIELD]``.
- ``snapshot`` lists the versions of ``targets`` and every product role; ``timestamp`` the version of
  ``snapshot``.

A root is accepted only with its own threshold of valid signatures and, for a rotation, the previous
root's threshold as well, and only as the exact next version (:func:`verify_root`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from fleetward.errors import InvalidInput, UpdateRefused
from fleetward.wire.updates import (
    DIRECTOR_FIELD,
    FLOORS_FIELD,
    TargetCustom,
    director_entry,
    director_role,
    product_paths,
    product_role,
)

SPEC_VERSION = "1.0.31"
#: the roles whose keys the server holds, besides the product roles
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
#: the name of the director's keys in the key store (it is not a TUF role)
DIRECTOR = "director"
#: the most offline root keys a root may name
MAX_ROOT_KEYS = 16

_SERIALIZER = JSONSerializer(compact=True)


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata is valid, and when the server signs it again."""

    root: dt.timedelta = dt.timedelta(days=365)
    targets: dt.timedelta = dt.timedelta(days=90)
    product: dt.timedelta = dt.timedelta(days=90)
    snapshot: dt.timedelta = dt.timedelta(days=7)
    timestamp: dt.timedelta = dt.timedelta(days=1)

    def __post_init__(self) -> None:
        for name in ("root", "targets", "product", "snapshot", "timestamp"):
            value = getattr(self, name)
            if not isinstance(value, dt.timedelta):
                raise TypeError(f"the {name} lifetime is a timedelta")
            if value < dt.timedelta(minutes=1):
                raise ValueError(f"the {name} lifetime must be at least a minute")

    def lifetime(self, role: str) -> dt.timedelta:
        """The lifetime of ``role`` (a product role's name is ``product-<id>``)."""
        if role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            value: dt.timedelta = getattr(self, role)
            return value
        return self.product

    def expires(self, role: str, now: dt.datetime) -> dt.datetime:
        """When metadata of ``role`` signed at ``now`` expires (whole seconds: TUF has no fractions)."""
        return (now + self.lifetime(role)).replace(microsecond=0)

    def needs_refresh(self, role: str, expires: dt.datetime, now: dt.datetime) -> bool:
        """Whether metadata of ``role`` expiring at ``expires`` should be signed again: less than half its
        lifetime is left."""
        return expires - now < self.lifetime(role) / 2


@dataclass(frozen=True)
class OnlineKeys:
    """The public halves of the keys the server holds, as the root names them."""

    targets: Key
    snapshot: Key
    timestamp: Key
    director: Key

    def for_role(self, role: str) -> Key:
        key: Key = getattr(self, role)
        return key


# --------------------------------------------------------------------------- root


def propose_root(
    root_keys: Sequence[Key],
    threshold: int,
    online: OnlineKeys,
    *,
    now: dt.datetime,
    policy: ExpiryPolicy,
    previous: Root | None = None,
) -> Metadata[Root]:
    """An unsigned root for the offline ``root_keys`` (``threshold`` of them must sign it) naming the
    online keys; version 1, or the previous root's version + 1 for a rotation."""
    if not root_keys or len(root_keys) > MAX_ROOT_KEYS:
        raise InvalidInput(f"a root names 1 to {MAX_ROOT_KEYS} offline keys", code="root_keys_invalid")
    keyids = [key.keyid for key in root_keys]
    if len(set(keyids)) != len(keyids):
        raise InvalidInput("the same root key is listed twice", code="root_keys_invalid")
    if not 1 <= threshold <= len(root_keys):
        raise InvalidInput(
            f"the threshold must be between 1 and the {len(root_keys)} root key(s)", code="threshold_invalid"
        )
    online_ids = {online.for_role(role).keyid for role in (*ONLINE_ROLES, DIRECTOR)}
    if online_ids & set(keyids):
        raise InvalidInput("an offline root key may not be an online key", code="root_keys_invalid")
    root = Root(
        version=1 if previous is None else previous.version + 1,
        spec_version=SPEC_VERSION,
        expires=policy.expires(Root.type, now),
        consistent_snapshot=True,
        unrecognized_fields={DIRECTOR_FIELD: director_entry([online.director], 1)},
    )
    for key in root_keys:
        root.add_key(key, Root.type)
    root.roles[Root.type].threshold = threshold
    for role in ONLINE_ROLES:
        root.add_key(online.for_role(role), role)
    root.keys[online.director.keyid] = online.director
    return Metadata(root)


def verify_root(data: bytes, previous: Metadata[Root] | None, *, max_bytes: int) -> Metadata[Root]:
    """A signed root upload, verified: ``UpdateRefused`` unless it is the exact next version and carries
    its own threshold of valid signatures and, for a rotation, the previous root's threshold as well."""
    if len(data) > max_bytes:
        raise InvalidInput(f"a root is at most {max_bytes} bytes", code="root_too_large")
    try:
        metadata = Metadata[Root].from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError) as error:
        raise InvalidInput(f"the root is malformed: {error}", code="root_malformed") from None
    if not isinstance(metadata.signed, Root):
        raise InvalidInput("the upload is not root metadata", code="root_malformed")
    root = metadata.signed
    expected = 1 if previous is None else previous.signed.version + 1
    if root.version != expected:
        raise UpdateRefused(
            f"the root's version is {root.version}; the next version is {expected}", code="root_version"
        )
    if not root.consistent_snapshot:
        raise UpdateRefused("the root must use consistent snapshots", code="root_malformed")
    _check_threshold(metadata, metadata, "its own")
    if previous is not None:
        _check_threshold(previous, metadata, "the previous root's")
    director_role(root)  # it names a director it holds the keys of
    return metadata


def _check_threshold(delegator: Metadata[Root], root: Metadata[Root], whose: str) -> None:
    try:
        delegator.verify_delegate(Root.type, root)
    except UnsignedMetadataError as error:
        raise UpdateRefused(
            f"the root does not carry {whose} threshold of valid signatures: {error}",
            code="root_threshold_not_met",
        ) from None


def check_online_keys(root: Root, online: OnlineKeys) -> None:
    """``UpdateRefused`` unless ``root`` names exactly the online keys the server holds (one per role)."""
    for role in ONLINE_ROLES:
        if root.roles[role].keyids != [online.for_role(role).keyid] or root.roles[role].threshold != 1:
            raise UpdateRefused(
                f"the root's {role} role does not name the server's online key: sign the proposed root",
                code="root_online_keys",
            )
    if director_role(root).keyids != [online.director.keyid]:
        raise UpdateRefused(
            "the root's director entry does not name the server's director key: sign the proposed root",
            code="root_online_keys",
        )


def root_keys(root: Root) -> list[Key]:
    """The offline keys that sign ``root``."""
    return [root.keys[keyid] for keyid in root.roles[Root.type].keyids]


# --------------------------------------------------------------------------- targets, products


def build_targets(version: int, expires: dt.datetime, product_keys: Mapping[str, Key]) -> Metadata[Targets]:
    """Unsigned top-level targets: no targets of its own, one terminating delegation per product."""
    keys: dict[str, Key] = {}
    roles: dict[str, DelegatedRole] = {}
    for product_id in sorted(product_keys):
        key = product_keys[product_id]
        keys[key.keyid] = key
        name = product_role(product_id)
        roles[name] = DelegatedRole(name, [key.keyid], 1, True, paths=product_paths(product_id))
    delegations = Delegations(keys, roles) if roles else None
    return Metadata(
        Targets(
            version=version,
            spec_version=SPEC_VERSION,
            expires=expires,
            targets={},
            delegations=delegations,
        )
    )


def target_file(path: str, length: int, sha256: str, custom: TargetCustom) -> TargetFile:
    """An image's (or a delta's) target, as a product role lists it."""
    return TargetFile(
        length=length,
        hashes={"sha256": sha256},
        path=path,
        unrecognized_fields={"custom": custom.model_dump(mode="json", exclude_none=True)},
    )


def build_product_role(
    product_id: str,
    version: int,
    expires: dt.datetime,
    targets: Sequence[TargetFile],
    floors: Mapping[str, str],
) -> Metadata[Targets]:
    """Unsigned metadata of a product's role: its images and deltas, and the security floors."""
    prefix = f"{product_id}/"
    for target in targets:
        if not target.path.startswith(prefix):
            raise ValueError(f"the target {target.path} is outside the product {product_id}")
    return Metadata(
        Targets(
            version=version,
            spec_version=SPEC_VERSION,
            expires=expires,
            targets={target.path: target for target in targets},
            unrecognized_fields={FLOORS_FIELD: dict(sorted(floors.items()))},
        )
    )


# --------------------------------------------------------------------------- snapshot, timestamp


def build_snapshot(version: int, expires: dt.datetime, versions: Mapping[str, int]) -> Metadata[Snapshot]:
    """Unsigned snapshot listing the version of ``targets`` and of each product role (``role → version``)."""
    if Targets.type not in versions:
        raise ValueError("a snapshot lists the targets role")
    meta = {f"{role}.json": MetaFile(version=versions[role]) for role in sorted(versions)}
    return Metadata(Snapshot(version=version, spec_version=SPEC_VERSION, expires=expires, meta=meta))


def build_timestamp(version: int, expires: dt.datetime, snapshot_version: int) -> Metadata[Timestamp]:
    """Unsigned timestamp naming the current snapshot."""
    return Metadata(
        Timestamp(
            version=version,
            spec_version=SPEC_VERSION,
            expires=expires,
            snapshot_meta=MetaFile(version=snapshot_version),
        )
    )


def signed_bytes(
    metadata: Metadata[Root] | Metadata[Targets] | Metadata[Snapshot] | Metadata[Timestamp], signer: Signer
) -> bytes:
    """``metadata`` signed by ``signer`` (replacing any signature), as served."""
    metadata.sign(signer, append=False)
    return metadata.to_bytes(_SERIALIZER)


def unsigned_bytes(metadata: Metadata[Root]) -> bytes:
    """``metadata`` without signatures, as proposed to the offline key holders."""
    metadata.signatures.clear()
    return metadata.to_bytes(_SERIALIZER)


def sign_root(data: bytes, signers: Sequence[Signer]) -> bytes:
    """The operator's side: add each signer's signature to a proposed root (keeping those it carries)."""
    try:
        metadata = Metadata[Root].from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError) as error:
        raise InvalidInput(f"the proposed root is malformed: {error}", code="root_malformed") from None
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata.to_bytes(_SERIALIZER)


def metadata_name(role: str, version: int | None) -> str:
    """The file name ngclient asks for: ``timestamp.json`` or ``N.role.json`` (consistent snapshots)."""
    return f"{role}.json" if version is None else f"{version}.{role}.json"


def parse_metadata_name(name: str) -> tuple[str, int | None]:
    """``(role, version)`` from a metadata file name; ``InvalidInput`` if it is not one."""
    if name == "timestamp.json":
        return Timestamp.type, None
    version, _, rest = name.partition(".")
    role = rest.removesuffix(".json")
    if not version.isdigit() or not rest.endswith(".json") or not role or len(version) > 9:
        raise InvalidInput("not a metadata file name", code="metadata_name")
    return role, int(version)


def consistent_target_name(path: str) -> tuple[str, str]:
    """``(target path, sha256)`` from the hash-prefixed name a consistent-snapshot client downloads
    (``dir/<sha256>.name``); ``InvalidInput`` if it is not one."""
    directory, _, name = path.rpartition("/")
    digest, _, base = name.partition(".")
    if len(digest) != 64 or not base or any(char not in "0123456789abcdef" for char in digest):
        raise InvalidInput("not a hash-prefixed target path", code="target_name")
    return (f"{directory}/{base}" if directory else base), digest


__all__ = [
    "DIRECTOR",
    "ONLINE_ROLES",
    "ExpiryPolicy",
    "OnlineKeys",
    "build_product_role",
    "build_snapshot",
    "build_targets",
    "build_timestamp",
    "check_online_keys",
    "consistent_target_name",
    "metadata_name",
    "parse_metadata_name",
    "propose_root",
    "root_keys",
    "sign_root",
    "signed_bytes",
    "target_file",
    "unsigned_bytes",
    "verify_root",
]
