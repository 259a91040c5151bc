"""The shell of each tenant's TUF image repository: keys, metadata versions and images in the store.

The offline root keys never reach the server: :meth:`ImageService.propose_root` hands out an unsigned root
naming the server's online keys, the operator signs it locally, and :meth:`ImageService.accept_root`
takes it only if it verifies (``repository.verify_root``). Online private keys (targets, snapshot,
timestamp, one per product, the director) are P-256 keys sealed under the master key. Every metadata
version is kept in ``tuf_metadata``; what a device asks for is read from there, and the timestamp (and,
when they come near expiry, the snapshot, targets and product roles) is signed again on read, in a write
transaction, so any process of any node may do it and only one does.

Adding an image stores its bytes, registers its reference value with the authority (what measured launch
measures: the component id, the version and the package's SHA-256), computes a bsdiff delta from each
of the ``Limits.image_delta_bases`` (3) highest earlier versions of the same component (keeping those
smaller than the image), and publishes new product role, targets, snapshot and timestamp versions.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import bsdiff4
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey
from sqlalchemy.engine import Connection
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from fleetward.agent.package import PackageLimits, remove_tree, unpack_package
from fleetward.authority.keystore import KeyStore
from fleetward.authority.service import AuthorityService, ReferenceValue
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import Conflict, FleetwardError, InvalidInput, NotFound, PayloadTooLarge
from fleetward.registry.access import Principal
from fleetward.registry.models import Scope
from fleetward.store import events as event_log
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import (
    image_blobs,
    image_deltas,
    images,
    products,
    security_floors,
    tuf_keys,
    tuf_metadata,
)
from fleetward.updates import repository
from fleetward.updates.models import Image, RepositoryStatus
from fleetward.updates.repository import DIRECTOR, ONLINE_ROLES, ExpiryPolicy, OnlineKeys
from fleetward.wire.reports import COMPONENT_ID_PATTERN
from fleetward.wire.updates import (
    DIRECTOR_FIELD,
    ImageKind,
    TargetCustom,
    delta_path,
    product_of,
    product_role,
    target_path,
)
from fleetward.wire.versions import parse_version

#: how many unsealed signers a process keeps
_SIGNER_CACHE = 1024
_PRODUCT_PREFIX = "product-"


def _key_label(tenant_id: str, role: str, keyid: str) -> str:
    return f"tuf:{tenant_id}:{role}:{keyid}"


def _image(row: Any) -> Image:
    return Image(
        id=row.id,
        tenant_id=row.tenant_id,
        product_id=row.product_id,
        component_id=row.component_id,
        kind=ImageKind(row.kind),
        version=row.version,
        sha256=row.sha256,
        length=int(row.length),
        target_path=row.target_path,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def _custom(row: Any, delta_base_sha256: str | None = None) -> TargetCustom:
    return TargetCustom(
        component_id=row.component_id,
        version=row.version,
        kind=ImageKind(row.kind),
        product_id=row.product_id,
        publisher_signature=base64.b64encode(bytes(row.publisher_signature)).decode("ascii"),
        delta_base_sha256=delta_base_sha256,
        delta_of=row.target_path if delta_base_sha256 is not None else None,
    )


class ImageService:
    """Each tenant's image repository: roots, online keys, metadata versions, images and deltas."""

    def __init__(
        self,
        database: Database,
        keystore: KeyStore,
        clock: Clock,
        limits: Limits,
        authority: AuthorityService,
        policy: ExpiryPolicy | None = None,
    ) -> None:
        self._db = database
        self._keys = keystore
        self._clock = clock
        self._limits = limits
        self._authority = authority
        self.policy = policy or ExpiryPolicy()
        self._signers: dict[str, CryptoSigner] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- keys

    def _signer(self, tenant_id: str, row: Any) -> CryptoSigner:
        """The unsealed signer of a key row (cached: a key id names its key for good)."""
        with self._lock:
            cached = self._signers.get(row.keyid)
        if cached is not None:
            return cached
        private = self._keys.unseal(bytes(row.sealed_key), _key_label(tenant_id, row.role, row.keyid))
        signer = CryptoSigner(private, _public_key(row))
        with self._lock:
            if len(self._signers) >= _SIGNER_CACHE:
                self._signers.clear()
            self._signers[row.keyid] = signer
        return signer

    def _new_key(self, connection: Connection, tenant_id: str, role: str, *, active: bool) -> Key:
        private = ec.generate_private_key(ec.SECP256R1())
        public = SSlibKey.from_crypto(private.public_key())
        connection.execute(
            tuf_keys.insert().values(
                keyid=public.keyid,
                tenant_id=tenant_id,
                role=role,
                public_key=json.dumps(public.to_dict()),
                sealed_key=self._keys.seal(private, _key_label(tenant_id, role, public.keyid)),
                active=active,
                created_at=self._clock.now(),
            )
        )
        return public

    @staticmethod
    def _key_rows(connection: Connection, tenant_id: str, *, online: bool) -> list[Any]:
        sealed = tuf_keys.c.sealed_key.is_not(None) if online else tuf_keys.c.sealed_key.is_(None)
        return list(
            connection.execute(
                sa.select(tuf_keys).where(tuf_keys.c.tenant_id == tenant_id, sealed).order_by(tuf_keys.c.role)
            )
        )

    def _active_row(self, connection: Connection, tenant_id: str, role: str) -> Any:
        row = connection.execute(
            sa.select(tuf_keys).where(
                tuf_keys.c.tenant_id == tenant_id,
                tuf_keys.c.role == role,
                tuf_keys.c.active.is_(True),
                tuf_keys.c.sealed_key.is_not(None),
            )
        ).first()
        if row is None:
            raise Conflict(
                "the image repository has no root yet: run `fleetward repo init`",
                code="repository_not_initialized",
            )
        return row

    # ---------------------------------------------------------------- root

    def _current_root(self, connection: Connection, tenant_id: str) -> Metadata[Root] | None:
        row = connection.execute(
            sa.select(tuf_metadata.c.body)
            .where(tuf_metadata.c.tenant_id == tenant_id, tuf_metadata.c.role == Root.type)
            .order_by(tuf_metadata.c.version.desc())
            .limit(1)
        ).first()
        return None if row is None else Metadata[Root].from_bytes(bytes(row.body))

    def propose_root(
        self,
        principal: Principal,
        tenant_id: str,
        root_keys: list[Key],
        threshold: int,
        rotate_online: bool = False,
        *,
        rotation: bool = False,
    ) -> bytes:
        """An unsigned root for the offline ``root_keys`` naming the server's online keys (new ones on the
        first root, or with ``rotate_online``); the operator signs it and hands it to :meth:`accept_root`.
        Administrators only.

        ``rotation`` says which the operator means: the first root (``Conflict``
        ``repository_initialized`` once there is one, so that ``repo init`` never replaces a root by one
        naming only the keys it was given) or a rotation (``Conflict`` ``repository_not_initialized``
        while there is none)."""
        principal.require(tenant_id, Scope.ADMIN)
        for key in root_keys:
            if not isinstance(key, SSlibKey) or key.keytype != "ecdsa":
                raise InvalidInput("root keys are ECDSA keys", code="root_keys_invalid")
        now = self._clock.now()
        with self._db.write() as connection:
            previous = self._current_root(connection, tenant_id)
            if previous is not None and not rotation:
                raise Conflict(
                    f"the image repository is already initialised (root version {previous.signed.version}): "
                    "use `fleetward repo rotate-root`",
                    code="repository_initialized",
                )
            if previous is None and rotation:
                raise Conflict(
                    "the image repository has no root to rotate yet: run `fleetward repo init`",
                    code="repository_not_initialized",
                )
            pending = {
                row.role: row
                for row in self._key_rows(connection, tenant_id, online=True)
                if not row.active and row.role in (*ONLINE_ROLES, DIRECTOR)
            }
            if previous is None or rotate_online:
                if set(pending) != {*ONLINE_ROLES, DIRECTOR}:
                    self._drop_pending(connection, tenant_id)
                    pending = {}
                keys = {
                    role: _public_key(pending[role])
                    if role in pending
                    else self._new_key(connection, tenant_id, role, active=False)
                    for role in (*ONLINE_ROLES, DIRECTOR)
                }
            else:
                self._drop_pending(connection, tenant_id)
                keys = {
                    role: _public_key(self._active_row(connection, tenant_id, role))
                    for role in (*ONLINE_ROLES, DIRECTOR)
                }
            online = OnlineKeys(keys[Targets.type], keys[Snapshot.type], keys[Timestamp.type], keys[DIRECTOR])
            proposal = repository.propose_root(
                root_keys,
                threshold,
                online,
                now=now,
                policy=self.policy,
                previous=None if previous is None else previous.signed,
            )
            for key in root_keys:
                connection.execute(
                    self._db.insert_or_ignore(tuf_keys).values(
                        keyid=key.keyid,
                        tenant_id=tenant_id,
                        role=Root.type,
                        public_key=json.dumps(key.to_dict()),
                        sealed_key=None,
                        active=False,
                        created_at=now,
                    )
                )
        return repository.unsigned_bytes(proposal)

    @staticmethod
    def _drop_pending(connection: Connection, tenant_id: str) -> None:
        connection.execute(
            tuf_keys.delete().where(
                tuf_keys.c.tenant_id == tenant_id,
                tuf_keys.c.active.is_(False),
                tuf_keys.c.sealed_key.is_not(None),
                tuf_keys.c.role.in_([*ONLINE_ROLES, DIRECTOR]),
            )
        )

    def accept_root(self, principal: Principal, tenant_id: str, signed_root: bytes) -> int:
        """Take a signed root: its own threshold of signatures, the previous root's for a rotation, the
        exact next version, the server's online keys. The first root also publishes targets, snapshot and
        timestamp; a rotation signs them again. Returns the root's version."""
        principal.require(tenant_id, Scope.ADMIN)
        now = self._clock.now()
        with self._db.write() as connection:
            previous = self._current_root(connection, tenant_id)
            metadata = repository.verify_root(signed_root, previous, max_bytes=self._limits.max_request_bytes)
            root = metadata.signed
            if root.is_expired(now):
                raise InvalidInput("the root has already expired", code="root_expired")
            rows = {row.keyid: row for row in self._key_rows(connection, tenant_id, online=True)}
            named = {role: root.roles[role].keyids for role in ONLINE_ROLES}
            named[DIRECTOR] = list(root.unrecognized_fields[DIRECTOR_FIELD]["keyids"])
            keys: dict[str, Key] = {}
            for role, keyids in named.items():
                row = rows.get(keyids[0]) if len(keyids) == 1 else None
                if row is None or row.role != role:
                    raise InvalidInput(
                        f"the root's {role} key is not one the server holds: sign the proposed root",
                        code="root_online_keys",
                    )
                keys[role] = _public_key(row)
            online = OnlineKeys(keys[Targets.type], keys[Snapshot.type], keys[Timestamp.type], keys[DIRECTOR])
            repository.check_online_keys(root, online)
            chosen = [key.keyid for key in keys.values()]
            roles = [*ONLINE_ROLES, DIRECTOR]
            scope = sa.and_(tuf_keys.c.tenant_id == tenant_id, tuf_keys.c.role.in_(roles))
            connection.execute(tuf_keys.delete().where(scope, tuf_keys.c.keyid.not_in(chosen)))
            connection.execute(tuf_keys.update().where(scope).values(active=True))
            root_ids = root.roles[Root.type].keyids
            owned = sa.and_(tuf_keys.c.tenant_id == tenant_id, tuf_keys.c.role == Root.type)
            connection.execute(tuf_keys.update().where(owned).values(active=tuf_keys.c.keyid.in_(root_ids)))
            connection.execute(
                tuf_metadata.insert().values(
                    tenant_id=tenant_id,
                    role=Root.type,
                    version=root.version,
                    body=signed_root,
                    expires_at=root.expires,
                    created_at=now,
                )
            )
            self._publish(connection, tenant_id, now, products=self._product_ids(connection, tenant_id))
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="updates",
                        code="root_accepted" if previous is None else "root_rotated",
                        detail=f"image repository root version {root.version} accepted "
                        f"({root.roles[Root.type].threshold} of {len(root_ids)} offline keys)",
                        severity=Severity.INFO if previous is None else Severity.WARNING,
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
        with self._lock:
            self._signers.clear()  # retired online keys are gone from the store
        return int(root.version)

    def root(self, tenant_id: str) -> Root:
        """The signed part of the tenant's current root."""
        with self._db.read() as connection:
            current = self._current_root(connection, tenant_id)
        if current is None:
            raise NotFound("the image repository has no root yet", code="repository_not_initialized")
        return current.signed

    def trusted_root_bytes(self, tenant_id: str) -> bytes:
        """The current root metadata, signed: what devices are provisioned with."""
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(tuf_metadata.c.body)
                .where(tuf_metadata.c.tenant_id == tenant_id, tuf_metadata.c.role == Root.type)
                .order_by(tuf_metadata.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            raise NotFound("the image repository has no root yet", code="repository_not_initialized")
        return bytes(row.body)

    def director_signer(self, tenant_id: str) -> Signer:
        """The director's signer (its key is named by the current root)."""
        with self._db.read() as connection:
            row = self._active_row(connection, tenant_id, DIRECTOR)
        return self._signer(tenant_id, row)

    def status(self, principal: Principal, tenant_id: str) -> RepositoryStatus:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            current = self._current_root(connection, tenant_id)
            latest = self._latest(connection, tenant_id)
            count = connection.execute(
                sa.select(sa.func.count()).select_from(images).where(images.c.tenant_id == tenant_id)
            ).scalar_one()
        root = None if current is None else current.signed
        return RepositoryStatus(
            tenant_id=tenant_id,
            initialized=root is not None,
            root_version=0 if root is None else root.version,
            root_threshold=0 if root is None else root.roles[Root.type].threshold,
            root_keyids=() if root is None else tuple(root.roles[Root.type].keyids),
            root_expires=None if root is None else root.expires,
            roles={role: (version, expires) for role, (version, expires) in sorted(latest.items())},
            images=int(count),
        )

    # ---------------------------------------------------------------- publishing

    @staticmethod
    def _latest(connection: Connection, tenant_id: str) -> dict[str, tuple[int, dt.datetime]]:
        """role → (latest version, its expiry)."""
        newest = (
            sa.select(tuf_metadata.c.role, sa.func.max(tuf_metadata.c.version).label("version"))
            .where(tuf_metadata.c.tenant_id == tenant_id)
            .group_by(tuf_metadata.c.role)
            .subquery()
        )
        rows = connection.execute(
            sa.select(tuf_metadata.c.role, tuf_metadata.c.version, tuf_metadata.c.expires_at).join(
                newest,
                sa.and_(
                    tuf_metadata.c.tenant_id == tenant_id,
                    tuf_metadata.c.role == newest.c.role,
                    tuf_metadata.c.version == newest.c.version,
                ),
            )
        )
        return {row.role: (int(row.version), row.expires_at) for row in rows}

    @staticmethod
    def _product_ids(connection: Connection, tenant_id: str) -> list[str]:
        """The products that have a role (a key) in the repository."""
        rows = connection.execute(
            sa.select(tuf_keys.c.role).where(
                tuf_keys.c.tenant_id == tenant_id,
                tuf_keys.c.role.like(f"{_PRODUCT_PREFIX}%"),
                tuf_keys.c.active.is_(True),
            )
        )
        return sorted(row.role.removeprefix(_PRODUCT_PREFIX) for row in rows)

    def _store(
        self,
        connection: Connection,
        tenant_id: str,
        role: str,
        body: bytes,
        expires: dt.datetime,
        version: int,
        now: dt.datetime,
    ) -> None:
        connection.execute(
            tuf_metadata.insert().values(
                tenant_id=tenant_id, role=role, version=version, body=body, expires_at=expires, created_at=now
            )
        )

    def _publish(
        self,
        connection: Connection,
        tenant_id: str,
        now: dt.datetime,
        *,
        products: Iterable[str] = (),
        targets: bool = True,
        snapshot: bool = True,
    ) -> None:
        """New versions of the product roles ``products``, of targets (if asked), snapshot (if asked or
        anything above changed) and timestamp, in the caller's transaction."""
        latest = self._latest(connection, tenant_id)
        if Root.type not in latest:
            raise Conflict(
                "the image repository has no root yet: run `fleetward repo init`",
                code="repository_not_initialized",
            )
        versions = {role: version for role, (version, _expires) in latest.items()}

        def publish(role: str, build: Callable[[int, dt.datetime], Any]) -> None:
            """The next version of ``role``: built, signed with the role's online key, stored."""
            version = versions.get(role, 0) + 1
            expires = self.policy.expires(role, now)
            signer = self._signer(tenant_id, self._active_row(connection, tenant_id, role))
            body = repository.signed_bytes(build(version, expires), signer)
            self._store(connection, tenant_id, role, body, expires, version, now)
            versions[role] = version

        floors = self._floors(connection, tenant_id)
        for product_id in products:
            listed_targets = self._product_targets(connection, tenant_id, product_id)
            publish(  # called at once: the lambda sees this iteration's product
                product_role(product_id),
                lambda version, expires: repository.build_product_role(
                    product_id,  # noqa: B023
                    version,
                    expires,
                    listed_targets,  # noqa: B023
                    floors,
                ),
            )
        if targets or Targets.type not in versions:
            product_keys = {
                product_id: _public_key(self._active_row(connection, tenant_id, product_role(product_id)))
                for product_id in self._product_ids(connection, tenant_id)
            }
            publish(
                Targets.type,
                lambda version, expires: repository.build_targets(version, expires, product_keys),
            )
        if snapshot or targets or products or Snapshot.type not in versions:
            listed = {
                role: number
                for role, number in versions.items()
                if role == Targets.type or role.startswith(_PRODUCT_PREFIX)
            }
            publish(
                Snapshot.type, lambda version, expires: repository.build_snapshot(version, expires, listed)
            )
        snapshot_version = versions[Snapshot.type]
        publish(
            Timestamp.type,
            lambda version, expires: repository.build_timestamp(version, expires, snapshot_version),
        )

    @staticmethod
    def _floors(connection: Connection, tenant_id: str) -> dict[str, str]:
        """The tenant's security floors of components (applications, by component id); floors of other
        measurements (the agent, by name) are the authority's to enforce at attestation."""
        rows = connection.execute(
            sa.select(security_floors.c.component, security_floors.c.minimum_version).where(
                security_floors.c.tenant_id == tenant_id
            )
        )
        return {
            row.component: row.minimum_version
            for row in rows
            if re.fullmatch(COMPONENT_ID_PATTERN, row.component)
        }

    def _product_targets(self, connection: Connection, tenant_id: str, product_id: str) -> list[TargetFile]:
        rows = {
            row.sha256: row
            for row in connection.execute(
                sa.select(images).where(images.c.tenant_id == tenant_id, images.c.product_id == product_id)
            )
        }
        listed = [
            repository.target_file(row.target_path, int(row.length), row.sha256, _custom(row))
            for row in rows.values()
        ]
        for delta in connection.execute(
            sa.select(image_deltas).where(
                image_deltas.c.tenant_id == tenant_id,
                image_deltas.c.target_path.like(f"{product_id}/%"),
            )
        ):
            image_row = rows.get(delta.target_sha256)
            if image_row is not None:
                listed.append(
                    repository.target_file(
                        delta.target_path,
                        int(delta.length),
                        delta.sha256,
                        _custom(image_row, delta.base_sha256),
                    )
                )
        return sorted(listed, key=lambda target: target.path)

    def publish_floors(self, principal: Principal, tenant_id: str) -> None:
        """Publish the tenant's security floors into every product role (after a floor changed)."""
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            if self._current_root(connection, tenant_id) is None:
                return  # no repository yet: the floors are published with the first image
            self._publish(
                connection, tenant_id, now, products=self._product_ids(connection, tenant_id), targets=False
            )

    # ---------------------------------------------------------------- what devices read

    def metadata(self, tenant_id: str, name: str) -> bytes:
        """The metadata file ``name`` as ngclient asks for it (``timestamp.json``, ``N.root.json``,
        ``N.snapshot.json``, ``N.targets.json``, ``N.product-<id>.json``); ``NotFound`` otherwise.

        Asking for the timestamp signs again whatever comes near its expiry."""
        role, version = repository.parse_metadata_name(name)
        if role not in (Root.type, Targets.type, Snapshot.type, Timestamp.type) and not role.startswith(
            _PRODUCT_PREFIX
        ):
            raise NotFound("no such metadata", code="metadata_not_found")
        if version is None:
            self._refresh(tenant_id)
        statement = sa.select(tuf_metadata.c.body).where(
            tuf_metadata.c.tenant_id == tenant_id, tuf_metadata.c.role == role
        )
        if version is None:
            statement = statement.order_by(tuf_metadata.c.version.desc()).limit(1)
        else:
            statement = statement.where(tuf_metadata.c.version == version)
        with self._db.read() as connection:
            row = connection.execute(statement).first()
        if row is None:
            raise NotFound(f"no metadata {name[:80]}", code="metadata_not_found")
        return bytes(row.body)

    def _stale(self, latest: dict[str, tuple[int, dt.datetime]], now: dt.datetime) -> set[str]:
        return {
            role
            for role, (_version, expires) in latest.items()
            if role != Root.type and self.policy.needs_refresh(role, expires, now)
        }

    def _refresh(self, tenant_id: str) -> None:
        now = self._clock.now()
        with self._db.read() as connection:
            stale = self._stale(self._latest(connection, tenant_id), now)
        if not stale:
            return
        try:
            with self._db.write() as connection:
                latest = self._latest(connection, tenant_id)
                stale = self._stale(latest, now)  # another process may have signed them meanwhile
                if not stale or Root.type not in latest:
                    return
                products = sorted(
                    role.removeprefix(_PRODUCT_PREFIX) for role in stale if role.startswith(_PRODUCT_PREFIX)
                )
                self._publish(
                    connection,
                    tenant_id,
                    now,
                    products=products,
                    targets=Targets.type in stale,
                    snapshot=Snapshot.type in stale,
                )
        except Conflict:
            pass  # another node signed the same versions first: theirs are served

    def target(self, tenant_id: str, path: str) -> bytes:
        """The bytes of a target by the hash-prefixed path a client downloads (``dir/<sha256>.name``)."""
        if len(path) > 600:
            raise NotFound("no such target", code="target_not_found")
        try:
            listed_path, digest = repository.consistent_target_name(path)
        except InvalidInput:
            raise NotFound("no such target", code="target_not_found") from None
        with self._db.read() as connection:
            listed = (
                connection.execute(
                    sa.select(images.c.sha256).where(
                        images.c.tenant_id == tenant_id,
                        images.c.target_path == listed_path,
                        images.c.sha256 == digest,
                    )
                ).first()
                or connection.execute(
                    sa.select(image_deltas.c.sha256).where(
                        image_deltas.c.tenant_id == tenant_id,
                        image_deltas.c.target_path == listed_path,
                        image_deltas.c.sha256 == digest,
                    )
                ).first()
            )
            blob = None
            if listed is not None:
                blob = connection.execute(
                    sa.select(image_blobs.c.data).where(
                        image_blobs.c.tenant_id == tenant_id, image_blobs.c.sha256 == digest
                    )
                ).first()
        if blob is None:
            raise NotFound("no such target", code="target_not_found")
        return bytes(blob.data)

    # ---------------------------------------------------------------- images

    def add_image(
        self,
        principal: Principal,
        tenant_id: str,
        product_id: str,
        package: bytes,
        signature: bytes,
        version: str,
        kind: ImageKind,
    ) -> Image:
        """Publish a signed package as an image of ``product_id`` (Contributor or above)."""
        principal.require(tenant_id, Scope.WRITE)
        if len(package) > self._limits.max_image_bytes:
            raise PayloadTooLarge(
                f"the image is {len(package)} bytes, more than {self._limits.max_image_bytes}",
                code="image_too_large",
            )
        if not 8 <= len(signature) <= PackageLimits().max_signature_bytes:
            raise InvalidInput(
                "the publisher signature is not a DER ECDSA signature", code="signature_invalid"
            )
        try:
            parse_version(version)
        except (TypeError, ValueError) as error:
            raise InvalidInput(str(error), code="version_invalid") from None
        kind = ImageKind(kind)
        manifest_json, component_id = _read_manifest(package, self._limits)
        sha256 = hashlib.sha256(package).hexdigest()
        path = target_path(product_id, component_id, version)
        with self._db.read() as connection:
            found = connection.execute(
                sa.select(products.c.id).where(products.c.tenant_id == tenant_id, products.c.id == product_id)
            ).first()
            if found is None:
                raise NotFound("no such product in this tenant", code="product_not_found")
            if self._current_root(connection, tenant_id) is None:
                raise Conflict(
                    "the image repository has no root yet: run `fleetward repo init`",
                    code="repository_not_initialized",
                )
            if self._image_row(connection, tenant_id, product_id, component_id, version) is not None:
                raise Conflict(f"version {version} of this component already exists", code="image_exists")
            bases = self._delta_bases(
                connection, tenant_id, product_id, component_id, version, self._limits.image_delta_bases
            )
        # a delta from each of the latest earlier versions, so that devices a version or two behind (or
        # back on an older one after a rollback) fetch a delta too; one that saves nothing is not kept
        deltas: list[tuple[str, bytes]] = []
        for base in bases:
            if base.sha256 != sha256:
                patch = bsdiff4.diff(base.data, package)
                if len(patch) < len(package):
                    deltas.append((base.sha256, patch))
        self._authority.add_reference_values(
            principal, tenant_id, [ReferenceValue(component_id, version, sha256)]
        )
        now = self._clock.now()
        image_id = str(uuid.uuid4())
        with self._db.write() as connection:
            connection.execute(
                self._db.insert_or_ignore(image_blobs).values(
                    tenant_id=tenant_id, sha256=sha256, data=package
                )
            )
            connection.execute(
                images.insert().values(
                    id=image_id,
                    tenant_id=tenant_id,
                    product_id=product_id,
                    component_id=component_id,
                    kind=kind.value,
                    version=version,
                    sha256=sha256,
                    length=len(package),
                    target_path=path,
                    publisher_signature=signature,
                    manifest=manifest_json,
                    created_by=principal.email,
                    created_at=now,
                )
            )
            for base_sha256, patch in deltas:
                patch_sha256 = hashlib.sha256(patch).hexdigest()
                connection.execute(
                    self._db.insert_or_ignore(image_blobs).values(
                        tenant_id=tenant_id, sha256=patch_sha256, data=patch
                    )
                )
                connection.execute(
                    self._db.insert_or_ignore(image_deltas).values(
                        tenant_id=tenant_id,
                        base_sha256=base_sha256,
                        target_sha256=sha256,
                        sha256=patch_sha256,
                        length=len(patch),
                        target_path=delta_path(product_id, component_id, version, base_sha256),
                    )
                )
            role = product_role(product_id)
            new_product = (
                connection.execute(
                    sa.select(tuf_keys.c.keyid).where(
                        tuf_keys.c.tenant_id == tenant_id,
                        tuf_keys.c.role == role,
                        tuf_keys.c.active.is_(True),
                    )
                ).first()
                is None
            )
            if new_product:
                self._new_key(connection, tenant_id, role, active=True)
            self._publish(connection, tenant_id, now, products=[product_id], targets=new_product)
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="updates",
                        code="image_added",
                        detail=f"{kind.value} image {component_id} {version} ({len(package)} bytes"
                        + "".join(f", delta {len(patch)} bytes" for _base, patch in deltas)
                        + f") published for product {product_id}",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            row = connection.execute(sa.select(images).where(images.c.id == image_id)).one()
        return _image(row)

    @staticmethod
    def _image_row(
        connection: Connection, tenant_id: str, product_id: str, component_id: str, version: str
    ) -> Any:
        return connection.execute(
            sa.select(images.c.id).where(
                images.c.tenant_id == tenant_id,
                images.c.product_id == product_id,
                images.c.component_id == component_id,
                images.c.version == version,
            )
        ).first()

    @staticmethod
    def _delta_bases(
        connection: Connection, tenant_id: str, product_id: str, component_id: str, version: str, count: int
    ) -> list[Any]:
        """The ``count`` highest earlier versions of the component in the product, with their bytes."""
        rows = connection.execute(
            sa.select(images.c.version, images.c.sha256).where(
                images.c.tenant_id == tenant_id,
                images.c.product_id == product_id,
                images.c.component_id == component_id,
            )
        ).all()
        new = parse_version(version)
        earlier = sorted(
            (row for row in rows if parse_version(row.version) < new),
            key=lambda row: parse_version(row.version),
            reverse=True,
        )[:count]
        return [
            connection.execute(
                sa.select(image_blobs.c.sha256, image_blobs.c.data).where(
                    image_blobs.c.tenant_id == tenant_id, image_blobs.c.sha256 == row.sha256
                )
            ).one()
            for row in earlier
        ]

    def list_images(
        self,
        principal: Principal,
        tenant_id: str,
        product_id: str | None = None,
        component_id: str | None = None,
        limit: int = 100,
    ) -> list[Image]:
        principal.require(tenant_id, Scope.READ)
        statement = sa.select(images).where(images.c.tenant_id == tenant_id)
        if product_id is not None:
            statement = statement.where(images.c.product_id == product_id)
        if component_id is not None:
            statement = statement.where(images.c.component_id == component_id)
        limit = max(1, min(limit, self._limits.max_list_items))
        with self._db.read() as connection:
            rows = connection.execute(statement.order_by(images.c.created_at.desc()).limit(limit)).all()
        return [_image(row) for row in rows]

    def image(self, tenant_id: str, image_id: str) -> Image:
        """The image ``image_id`` of ``tenant_id``; ``NotFound`` whether it is unknown or another's."""
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(images).where(images.c.tenant_id == tenant_id, images.c.id == image_id)
            ).first()
        if row is None:
            raise NotFound("no such image in this tenant", code="image_not_found")
        return _image(row)

    def get_image(self, principal: Principal, tenant_id: str, image_id: str) -> Image:
        principal.require(tenant_id, Scope.READ)
        return self.image(tenant_id, image_id)

    def target_file(self, tenant_id: str, image: Image) -> TargetFile:
        """The image's target exactly as its product role lists it (what an assignment must repeat)."""
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(images).where(images.c.tenant_id == tenant_id, images.c.id == image.id)
            ).first()
        if row is None:
            raise NotFound("no such image in this tenant", code="image_not_found")
        return repository.target_file(row.target_path, int(row.length), row.sha256, _custom(row))

    def delta_file(self, tenant_id: str, base_sha256: str, image: Image) -> TargetFile | None:
        """The target of the delta from the image with SHA-256 ``base_sha256`` to ``image``, if listed."""
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(images).where(images.c.tenant_id == tenant_id, images.c.id == image.id)
            ).first()
            delta = connection.execute(
                sa.select(image_deltas).where(
                    image_deltas.c.tenant_id == tenant_id,
                    image_deltas.c.base_sha256 == base_sha256,
                    image_deltas.c.target_sha256 == image.sha256,
                )
            ).first()
        if row is None or delta is None or product_of(delta.target_path) != image.product_id:
            return None
        return repository.target_file(
            delta.target_path, int(delta.length), delta.sha256, _custom(row, delta.base_sha256)
        )


def _public_key(row: Any) -> SSlibKey:
    return SSlibKey.from_dict(row.keyid, json.loads(row.public_key))


def _read_manifest(package: bytes, limits: Limits) -> tuple[str, str]:
    """The manifest (JSON) and component id of a package, checked as the device will check it."""
    package_limits = PackageLimits(max_package_bytes=limits.max_image_bytes)
    with tempfile.TemporaryDirectory(prefix="fleetward-image-") as scratch:
        root = Path(scratch) / "package"
        try:
            unpacked = unpack_package(io.BytesIO(package), root, package_limits)
        except FleetwardError as error:
            raise InvalidInput(f"the package is refused: {error.message}", code=error.code) from None
        finally:
            remove_tree(root)
    return unpacked.manifest.to_json().decode("utf-8"), unpacked.manifest.component_id


__all__ = ["Image", "ImageService"]
