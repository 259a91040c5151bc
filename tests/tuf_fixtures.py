"""A tenant's image repository and director in memory, served through ``httpx.MockTransport``.

In the spirit of python-tuf's ``RepositorySimulator``: real metadata built with python-tuf's metadata API and
signed with real ECDSA keys (root, targets delegating to one product role, snapshot, timestamp; consistent
snapshots; the director's key named in root), served at the URLs the update service uses. Tests change the
repository through its methods, then publish, and may make it misbehave (serve other bytes, cut a body, ignore
ranges) to play an attacker or a bad network. It stands in for the server in the device's tests; the real
server is tested against the same client elsewhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import bsdiff4
import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, Signer
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

from fleetward.errors import Unauthenticated
from fleetward.wire.updates import (
    DIRECTOR_FIELD,
    FLOORS_FIELD,
    DeviceToken,
    ImageKind,
    MaintenanceWindow,
    TargetCustom,
    VersionReport,
    assignment,
    delta_path,
    device_token,
    director_entry,
    product_paths,
    product_role,
    target_path,
)

SPEC_VERSION = "1.0.31"
PRODUCT = "panel-7"
DEVICE = "dev-00c0ffee"
DEPLOYMENT = "spring-rollout"
BASE_URL = "https://updates.fleetward.test"
METADATA_PREFIX = "/updates/v1/metadata/"
TARGETS_PREFIX = "/updates/v1/targets/"
_RANGE = re.compile(r"^bytes=(\d+)-$")


def utcnow() -> dt.datetime:
    """ngclient checks expiry against the system clock, so the repository's dates follow it."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class DeviceCredential:
    """A device's operational key and certificate serial: it signs a fresh token for each request."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    serial: str = "1f2e3d4c5b6a"

    def __call__(self) -> str:
        return device_token(self.key, self.serial, int(time.time()))


class _CutStream(httpx.SyncByteStream):
    """A body that stops after ``keep`` bytes, as when the network drops mid-download."""

    def __init__(self, data: bytes, keep: int) -> None:
        self._data = data
        self._keep = keep

    def __iter__(self) -> Iterator[bytes]:
        yield self._data[: self._keep]
        raise httpx.ReadError("the connection was reset")


class FakeUpdateServer:
    """One tenant's image repository and director, and what the device sent them."""

    def __init__(
        self,
        credential: DeviceCredential | None = None,
        *,
        product_id: str = PRODUCT,
        device_id: str = DEVICE,
    ) -> None:
        self.product_id = product_id
        self.device_id = device_id
        self.credential = credential or DeviceCredential()
        self.role = product_role(product_id)
        self.signers: dict[str, Signer] = {
            name: CryptoSigner.generate_ecdsa()
            for name in ("root", "targets", "snapshot", "timestamp", self.role, "director")
        }
        now = utcnow()
        director_key = self.signers["director"].public_key
        root = Root(
            expires=now + dt.timedelta(days=365),
            consistent_snapshot=True,
            unrecognized_fields={DIRECTOR_FIELD: director_entry([director_key], 1)},
        )
        for name in ("root", "targets", "snapshot", "timestamp"):
            root.add_key(self.signers[name].public_key, name)
        root.keys[director_key.keyid] = director_key
        self.root = Metadata(root)
        product_key = self.signers[self.role].public_key
        self.targets = Metadata(
            Targets(
                expires=now + dt.timedelta(days=30),
                delegations=Delegations(
                    keys={product_key.keyid: product_key},
                    roles={
                        self.role: DelegatedRole(
                            self.role, [product_key.keyid], 1, True, paths=product_paths(product_id)
                        )
                    },
                ),
            )
        )
        self.product = Metadata(Targets(expires=now + dt.timedelta(days=30)))
        self.snapshot = Metadata(Snapshot(expires=now + dt.timedelta(days=7)))
        self.timestamp = Metadata(Timestamp(expires=now + dt.timedelta(days=1)))
        for metadata in (self.targets, self.product, self.snapshot, self.timestamp):
            metadata.signed.version = 0
        #: every signed version of each role, as served at ``N.<role>.json``
        self.published: dict[str, dict[int, bytes]] = {}
        self.timestamp_bytes = b""
        #: image and delta bytes by their hash-prefixed path under the targets URL
        self.blobs: dict[str, bytes] = {}
        self.assignment_bytes: bytes | None = None
        self.assignment_version = 0
        #: bytes served instead of the real ones, by path under the metadata or targets URL
        self.overrides: dict[str, bytes] = {}
        #: cut the next body of a path under the targets URL after so many bytes (once)
        self.cuts: dict[str, int] = {}
        self.ignore_ranges = False
        self.requests: list[httpx.Request] = []
        self.reports: list[VersionReport] = []
        self._sign(self.root, "root")
        self.publish()

    # ----------------------------------------------------------------- the image repository

    @property
    def root_bytes(self) -> bytes:
        """The root the device was provisioned with (version 1)."""
        return self.published["root"][1]

    def image(
        self,
        component_id: str,
        version: str,
        content: bytes,
        *,
        kind: ImageKind = ImageKind.APP,
        product_id: str | None = None,
        listed: bool = True,
    ) -> TargetFile:
        """An image's target (listed by the product role unless ``listed`` is false); call :meth:`publish`."""
        product = product_id or self.product_id
        custom = TargetCustom(
            component_id=component_id,
            version=version,
            kind=kind,
            product_id=product,
            publisher_signature=base64.b64encode(b"publisher signature").decode(),
        )
        return self._add(target_path(product, component_id, version), content, custom, listed)

    def delta(self, component_id: str, version: str, base: bytes, content: bytes) -> TargetFile:
        """A bsdiff delta from ``base`` to ``content``, listed beside the image of ``version``."""
        full = target_path(self.product_id, component_id, version)
        base_sha256 = hashlib.sha256(base).hexdigest()
        custom = TargetCustom(
            component_id=component_id,
            version=version,
            product_id=self.product_id,
            publisher_signature=base64.b64encode(b"publisher signature").decode(),
            delta_base_sha256=base_sha256,
            delta_of=full,
        )
        path = delta_path(self.product_id, component_id, version, base_sha256)
        return self._add(path, bsdiff4.diff(base, content), custom, listed=True)

    def _add(self, path: str, content: bytes, custom: TargetCustom, listed: bool) -> TargetFile:
        target = TargetFile.from_data(path, content, ["sha256"])
        target.unrecognized_fields["custom"] = custom.model_dump(mode="json", exclude_none=True)
        self.blobs[blob_path(target)] = content
        if listed:
            self.product.signed.targets[path] = target
        return target

    def set_floors(self, floors: Mapping[str, str]) -> None:
        self.product.signed.unrecognized_fields[FLOORS_FIELD] = dict(floors)

    def publish(self, *, timestamp_expires: dt.datetime | None = None) -> None:
        """Sign new versions of targets, the product role, snapshot and timestamp."""
        self._sign(self.targets, "targets")
        self._sign(self.product, self.role)
        self.sign_snapshot()
        self.sign_timestamp(expires=timestamp_expires)

    def sign_snapshot(self, versions: Mapping[str, int] | None = None) -> None:
        """A new snapshot naming the latest targets versions, or ``versions`` (an attacker's choice)."""
        named = {"targets": self.targets.signed.version, self.role: self.product.signed.version}
        named.update(versions or {})
        self.snapshot.signed.meta = {f"{role}.json": MetaFile(version) for role, version in named.items()}
        self._sign(self.snapshot, "snapshot")

    def sign_timestamp(
        self, *, snapshot_version: int | None = None, expires: dt.datetime | None = None
    ) -> None:
        """A new timestamp naming the latest snapshot, or ``snapshot_version``."""
        signed = self.timestamp.signed
        signed.snapshot_meta = MetaFile(snapshot_version or self.snapshot.signed.version)
        signed.expires = expires or utcnow() + dt.timedelta(days=1)
        self._sign(self.timestamp, "timestamp")
        self.timestamp_bytes = self.timestamp.to_bytes()

    def _sign(self, metadata: Metadata, role: str) -> None:  # type: ignore[type-arg]
        if role != "root":
            metadata.signed.version += 1
        metadata.sign(self.signers[role])
        self.published.setdefault(role, {})[metadata.signed.version] = metadata.to_bytes()

    # ----------------------------------------------------------------- the director

    def assign(
        self,
        *targets: TargetFile,
        version: int | None = None,
        expires: dt.datetime | None = None,
        device_id: str | None = None,
        signer: Signer | None = None,
        window: MaintenanceWindow | None = None,
    ) -> int:
        """Sign an assignment of ``targets`` for the device (by default: the next version, valid a day)."""
        self.assignment_version = version if version is not None else self.assignment_version + 1
        metadata = assignment(
            device_id or self.device_id,
            DEPLOYMENT,
            {target.path: target for target in targets},
            version=self.assignment_version,
            expires=expires or utcnow() + dt.timedelta(days=1),
            window=window,
        )
        metadata.sign(signer or self.signers["director"])
        self.assignment_bytes = metadata.to_bytes()
        return self.assignment_version

    # ----------------------------------------------------------------- HTTP

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=self.transport(), base_url=BASE_URL)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        try:
            DeviceToken.parse(request.headers.get("Authorization", "")).verify(
                self.credential.key.public_key(), int(time.time()), 300
            )
        except Unauthenticated as error:
            return httpx.Response(401, json={"error": {"code": error.code, "message": error.message}})
        path = request.url.path
        if path.startswith(METADATA_PREFIX):
            return self._metadata(path.removeprefix(METADATA_PREFIX))
        if path.startswith(TARGETS_PREFIX):
            return self._target(path.removeprefix(TARGETS_PREFIX), request)
        if path == "/updates/v1/assignment" and request.method == "GET":
            if self.assignment_bytes is None:
                return httpx.Response(204)
            return httpx.Response(200, content=self.assignment_bytes)
        if path == "/updates/v1/report" and request.method == "POST":
            self.reports.append(VersionReport.model_validate_json(request.content))
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    def _metadata(self, name: str) -> httpx.Response:
        if name in self.overrides:
            return httpx.Response(200, content=self.overrides[name])
        if name == "timestamp.json":
            return httpx.Response(200, content=self.timestamp_bytes)
        match = re.fullmatch(r"(\d+)\.(.+)\.json", name)
        data = self.published.get(match.group(2), {}).get(int(match.group(1))) if match else None
        if data is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": name}})
        return httpx.Response(200, content=data)

    def _target(self, name: str, request: httpx.Request) -> httpx.Response:
        data = self.overrides.get(name, self.blobs.get(name))
        if data is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": name}})
        status, headers = 200, {}
        match = _RANGE.match(request.headers.get("Range", ""))
        if match and not self.ignore_ranges:
            start = int(match.group(1))
            if start >= len(data):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            data = data[start:]
        if name in self.cuts:
            return httpx.Response(status, headers=headers, stream=_CutStream(data, self.cuts.pop(name)))
        return httpx.Response(status, headers=headers, content=data)

    def target_requests(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path.startswith(TARGETS_PREFIX)]


def blob_path(target: TargetFile) -> str:
    """Where a target is under the targets URL: consistent snapshots prefix its name with its SHA-256."""
    directory, slash, name = target.path.rpartition("/")
    return f"{directory}{slash}{target.hashes['sha256']}.{name}"
