"""The device installs only what the image repository and the director agree on, fetched safely.

The repository is ``tests.tuf_fixtures.FakeUpdateServer``: real python-tuf metadata and real signatures,
served through ``httpx.MockTransport``; the client is the real ngclient behind an ``HttpxFetcher``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata

from fleetward.agent.update_client import (
    STATE_FILE,
    Downloaded,
    HttpxFetcher,
    Plan,
    UpdateClient,
    UpdateClientSettings,
)
from fleetward.clock import FakeClock
from fleetward.errors import ConfigurationError, TransportError, Unauthenticated, UpdateRefused
from fleetward.wire.updates import ImageKind, MaintenanceWindow, VersionReport
from tests.tuf_fixtures import (
    BASE_URL,
    DEVICE,
    PRODUCT,
    DeviceCredential,
    FakeUpdateServer,
    blob_path,
    utcnow,
)

APP = "0f0e0d0c-0b0a-4908-8706-050403020100"
AGENT = "a0a1a2a3-b0b1-4c0c-8d0d-e0e1e2e3e4e5"
OLD_IMAGE = b"panel monitor 1.0.0\n" * 3000
NEW_IMAGE = b"panel monitor 2.0.0\n" * 2900 + b"with a new feature\n" * 100


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


INSTALLED = {APP: ("1.0.0", sha256(OLD_IMAGE))}


@dataclass
class Device:
    """A device's update client and where it puts what it downloads."""

    client: UpdateClient
    root: Path

    @property
    def partial(self) -> Path:
        return self.root / "slot-b" / "image.part"

    @property
    def slot_files(self) -> list[Path]:
        return sorted((self.root / "slot-b").glob("*"))

    def install(self, have: Path | None = None) -> tuple[Plan, list[Downloaded]]:
        """What the agent does: check, then download each planned image into the inactive slot."""
        plan = self.client.check(INSTALLED)
        return plan, [self.client.download(image, self.partial, have) for image in plan.images]


@pytest.fixture
def server() -> FakeUpdateServer:
    return FakeUpdateServer()


def make_device(server: FakeUpdateServer, root: Path, *, http: httpx.Client | None = None) -> Device:
    settings = UpdateClientSettings(
        base_url=BASE_URL,
        metadata_dir=root / "tuf",
        device_id=DEVICE,
        product_id=PRODUCT,
        max_image_bytes=1024 * 1024,
        chunk_bytes=4096,
    )
    client = UpdateClient(
        settings,
        server.root_bytes,
        server.credential,
        http=http or server.client(),
        clock=FakeClock(utcnow()),
    )
    (root / "slot-b").mkdir(parents=True, exist_ok=True)
    return Device(client, root)


@pytest.fixture
def device(server: FakeUpdateServer, tmp_path: Path) -> Iterator[Device]:
    device = make_device(server, tmp_path)
    yield device
    device.client.close()


# --------------------------------------------------------------------------- the happy path


def test_a_device_checks_downloads_and_verifies_an_assigned_image(
    server: FakeUpdateServer, device: Device
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    window = MaintenanceWindow(dt.time(2, 0), dt.time(4, 0))
    server.assign(target, window=window)

    plan, [downloaded] = device.install()

    assert (plan.assignment_version, plan.deployment_id, plan.window) == (1, "spring-rollout", window)
    [image] = plan.images
    assert (image.component_id, image.version, image.kind) == (APP, "2.0.0", ImageKind.APP)
    assert image.sha256 == sha256(NEW_IMAGE)
    assert image.delta is None
    assert downloaded == Downloaded(device.partial, len(NEW_IMAGE), 0, False)
    assert device.partial.read_bytes() == NEW_IMAGE
    assert all(request.headers["Authorization"].startswith("FleetwardDevice ") for request in server.requests)
    fetched = {request.url.path.rsplit("/", 1)[-1] for request in server.requests}
    assert {"2.root.json", "timestamp.json", "2.snapshot.json", "2.targets.json"} <= fetched
    assert "2.product-panel-7.json" in fetched


def test_a_component_that_already_runs_the_assigned_image_needs_nothing(
    server: FakeUpdateServer, device: Device
) -> None:
    server.assign(server.image(APP, "1.0.0", OLD_IMAGE))
    server.publish()

    plan = device.client.check(INSTALLED)

    assert plan.deployment_id == "spring-rollout"
    assert plan.images == ()


def test_nothing_assigned_is_an_empty_plan(server: FakeUpdateServer, device: Device) -> None:
    plan = device.client.check(INSTALLED)

    assert plan == Plan(0, None, None, (), {})


def test_a_new_root_is_trusted_after_it_is_fetched_and_kept_in_the_metadata_dir(
    server: FakeUpdateServer, device: Device
) -> None:
    server.root.signed.version += 1
    server.root.sign(server.signers["root"])
    server.published["root"][2] = server.root.to_bytes()
    server.assign(server.image(APP, "2.0.0", NEW_IMAGE))
    server.publish()

    device.client.check(INSTALLED)

    assert Metadata.from_bytes((device.root / "tuf" / "root.json").read_bytes()).signed.version == 2


def test_the_device_reports_its_versions(server: FakeUpdateServer, device: Device) -> None:
    report = VersionReport(assignment_version=3, sent_at=utcnow())

    device.client.report(report)

    assert server.reports == [report]


# --------------------------------------------------------------------------- resumable downloads


def test_a_cut_download_resumes_with_a_range_request(server: FakeUpdateServer, device: Device) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)
    server.cuts[blob_path(target)] = 20_000
    [image] = device.client.check(INSTALLED).images

    with pytest.raises(TransportError) as cut:
        device.client.download(image, device.partial)
    assert cut.value.code == "download_interrupted"
    assert device.partial.stat().st_size == 20_000

    downloaded = device.client.download(image, device.partial)

    assert downloaded.bytes_downloaded == len(NEW_IMAGE) - 20_000
    assert device.partial.read_bytes() == NEW_IMAGE
    assert server.target_requests()[-1].headers["Range"] == "bytes=20000-"


def test_a_server_that_ignores_the_range_restarts_the_download_from_zero(
    server: FakeUpdateServer, device: Device
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)
    server.cuts[blob_path(target)] = 20_000
    [image] = device.client.check(INSTALLED).images
    with pytest.raises(TransportError):
        device.client.download(image, device.partial)
    server.ignore_ranges = True

    downloaded = device.client.download(image, device.partial)

    assert downloaded.bytes_downloaded == len(NEW_IMAGE)
    assert device.partial.read_bytes() == NEW_IMAGE


def test_a_complete_partial_is_verified_without_fetching_again(
    server: FakeUpdateServer, device: Device
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)
    [image] = device.client.check(INSTALLED).images
    device.client.download(image, device.partial)
    fetched = len(server.target_requests())

    again = device.client.download(image, device.partial)

    assert again.bytes_downloaded == 0
    assert len(server.target_requests()) == fetched


# --------------------------------------------------------------------------- deltas


@pytest.fixture
def have(device: Device) -> Path:
    """The package in the active slot: the installed image."""
    path = device.root / "slot-a" / "image.tar"
    path.parent.mkdir()
    path.write_bytes(OLD_IMAGE)
    return path


def test_a_listed_delta_is_applied_to_the_active_image_and_saves_bytes(
    server: FakeUpdateServer, device: Device, have: Path
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    delta = server.delta(APP, "2.0.0", OLD_IMAGE, NEW_IMAGE)
    server.publish()
    server.assign(target)

    plan, [downloaded] = device.install(have)

    assert plan.images[0].delta is not None
    assert plan.images[0].delta.path == delta.path
    assert downloaded.via_delta
    assert downloaded.bytes_downloaded == delta.length
    assert downloaded.bytes_saved == len(NEW_IMAGE) - delta.length > 0
    assert device.partial.read_bytes() == NEW_IMAGE
    assert device.slot_files == [device.partial]


def test_a_tampered_delta_falls_back_to_the_full_image(
    server: FakeUpdateServer, device: Device, have: Path
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    delta = server.delta(APP, "2.0.0", OLD_IMAGE, NEW_IMAGE)
    server.publish()
    server.assign(target)
    good = server.blobs[blob_path(delta)]
    server.overrides[blob_path(delta)] = good[:-1] + bytes([good[-1] ^ 1])

    _, [downloaded] = device.install(have)

    assert not downloaded.via_delta
    assert downloaded.delta_failure == "image_hash_mismatch"
    assert downloaded.bytes_saved == 0
    assert downloaded.bytes_downloaded == delta.length + len(NEW_IMAGE)
    assert device.partial.read_bytes() == NEW_IMAGE
    assert device.slot_files == [device.partial]


def test_a_delta_whose_base_is_not_the_active_image_falls_back_to_the_full_image(
    server: FakeUpdateServer, device: Device, have: Path
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.delta(APP, "2.0.0", OLD_IMAGE, NEW_IMAGE)
    server.publish()
    server.assign(target)
    have.write_bytes(b"something else")

    _, [downloaded] = device.install(have)

    assert (downloaded.via_delta, downloaded.delta_failure) == (False, "delta_base_mismatch")
    assert device.partial.read_bytes() == NEW_IMAGE


def test_a_delta_the_server_does_not_have_falls_back_to_the_full_image(
    server: FakeUpdateServer, device: Device, have: Path
) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    delta = server.delta(APP, "2.0.0", OLD_IMAGE, NEW_IMAGE)
    server.publish()
    server.assign(target)
    del server.blobs[blob_path(delta)]

    _, [downloaded] = device.install(have)

    assert (downloaded.via_delta, downloaded.delta_failure) == (False, "not_found")
    assert device.partial.read_bytes() == NEW_IMAGE


# --------------------------------------------------------------------------- attacks


def assign_new_image(server: FakeUpdateServer) -> None:
    server.assign(server.image(APP, "2.0.0", NEW_IMAGE))
    server.publish()


def tamper_image_bytes(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)
    server.overrides[blob_path(target)] = NEW_IMAGE.replace(b"feature", b"backdoo")


def serve_image_over_its_length(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)
    server.overrides[blob_path(target)] = NEW_IMAGE + b"\x00" * 5000


def tamper_timestamp(server: FakeUpdateServer) -> None:
    assign_new_image(server)
    timestamp = Metadata.from_bytes(server.timestamp_bytes)
    timestamp.signed.version += 1  # the signatures no longer cover what is signed
    server.timestamp_bytes = timestamp.to_bytes()


def sign_product_role_with_another_key(server: FakeUpdateServer) -> None:
    server.signers[server.role] = CryptoSigner.generate_ecdsa()
    assign_new_image(server)


def expire_timestamp(server: FakeUpdateServer) -> None:
    assign_new_image(server)
    server.sign_timestamp(expires=utcnow() - dt.timedelta(hours=1))


def replay_older_timestamp(server: FakeUpdateServer) -> None:
    server.timestamp_bytes = server.published["timestamp"][1]


def name_older_snapshot(server: FakeUpdateServer) -> None:
    server.sign_timestamp(snapshot_version=1)


def name_older_targets(server: FakeUpdateServer) -> None:
    server.sign_snapshot({"targets": 1})
    server.sign_timestamp()


def mix_and_match_targets(server: FakeUpdateServer) -> None:
    assign_new_image(server)
    newest = server.targets.signed.version
    server.overrides[f"{newest}.targets.json"] = server.published["targets"][newest - 1]


def assign_other_product(server: FakeUpdateServer) -> None:
    server.assign(server.image(APP, "2.0.0", NEW_IMAGE, product_id="kiosk-3", listed=False))


def assign_with_another_key(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target, signer=CryptoSigner.generate_ecdsa())


def assign_other_device(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target, device_id="dev-someone-else")


def assign_expired(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target, expires=utcnow() - dt.timedelta(minutes=1))


def assign_older_version(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target, version=server.assignment_version - 1)


def assign_unlisted_image(server: FakeUpdateServer) -> None:
    server.assign(server.image(APP, "2.0.0", NEW_IMAGE, listed=False))


def assign_image_the_repository_describes_otherwise(server: FakeUpdateServer) -> None:
    server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(server.image(APP, "2.0.0", NEW_IMAGE + b"!", listed=False))


def assign_below_floor(server: FakeUpdateServer) -> None:
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.set_floors({APP: "2.1"})
    server.publish()
    server.assign(target)


def lower_the_floor_after_it_was_seen(server: FakeUpdateServer) -> None:
    server.set_floors({APP: "1.5"})  # the product role's key may sign it: the device keeps the higher floor
    target = server.image(APP, "2.0.0", NEW_IMAGE)
    server.publish()
    server.assign(target)


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[FakeUpdateServer], None]
    code: str
    #: the device first completes a check of a good repository, then the attacker acts
    after_good_check: bool = False
    #: the device trusted a floor of 2.1 before the attack
    floor_seen: bool = False


ATTACKS = [
    Attack("tampered image bytes", tamper_image_bytes, "image_hash_mismatch"),
    Attack("image over its declared length", serve_image_over_its_length, "image_too_long"),
    Attack("timestamp whose signature does not cover it", tamper_timestamp, "metadata_signature_invalid"),
    Attack(
        "product role signed by another key", sign_product_role_with_another_key, "metadata_signature_invalid"
    ),
    Attack("expired timestamp (freeze)", expire_timestamp, "metadata_expired"),
    Attack("older timestamp replayed (rollback)", replay_older_timestamp, "metadata_rollback", True),
    Attack("new timestamp naming an older snapshot", name_older_snapshot, "metadata_rollback", True),
    Attack("new snapshot naming older targets", name_older_targets, "metadata_rollback", True),
    Attack(
        "targets other than the snapshot names (mix and match)",
        mix_and_match_targets,
        "metadata_version_mismatch",
    ),
    Attack("image of another product", assign_other_product, "image_other_product"),
    Attack("assignment signed by another key", assign_with_another_key, "assignment_signature_invalid"),
    Attack("assignment for another device", assign_other_device, "assignment_other_device"),
    Attack("expired assignment", assign_expired, "assignment_expired"),
    Attack("older assignment (rollback)", assign_older_version, "assignment_rollback", True),
    Attack("target the image repository does not list", assign_unlisted_image, "target_not_listed"),
    Attack(
        "target the image repository describes otherwise",
        assign_image_the_repository_describes_otherwise,
        "target_mismatch",
    ),
    Attack("version below the floor", assign_below_floor, "version_below_floor"),
    Attack(
        "floor lowered after a higher one was seen",
        lower_the_floor_after_it_was_seen,
        "version_below_floor",
        floor_seen=True,
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_an_attack_is_refused_with_its_code_and_leaves_nothing_installed(
    server: FakeUpdateServer, device: Device, attack: Attack
) -> None:
    if attack.after_good_check:
        assign_new_image(server)
        assign_new_image(server)
        device.client.check(INSTALLED)
    if attack.floor_seen:
        server.set_floors({APP: "2.1"})
        server.assign(server.image(APP, "2.2.0", NEW_IMAGE + b"2.2"))
        server.publish()
        assert device.client.check(INSTALLED).floors == {APP: "2.1"}
    attack.make(server)

    with pytest.raises(UpdateRefused) as refused:
        device.install()

    assert refused.value.code == attack.code, refused.value.message
    assert device.slot_files == []


def test_the_highest_floor_and_the_last_assignment_version_are_kept_across_restarts(
    server: FakeUpdateServer, device: Device, tmp_path: Path
) -> None:
    server.set_floors({APP: "2.1"})
    server.assign(server.image(APP, "2.2.0", NEW_IMAGE))
    server.publish()
    device.client.check(INSTALLED, floors_seen={AGENT: "3.0"})
    server.set_floors({})
    server.publish()

    restarted = make_device(server, tmp_path)
    plan = restarted.client.check(INSTALLED)

    assert plan.floors == {APP: "2.1", AGENT: "3.0"}
    assert plan.assignment_version == 1
    assert (tmp_path / "tuf" / STATE_FILE).exists()


# --------------------------------------------------------------------------- the network and the fetcher


def test_an_unreachable_repository_is_a_transport_error(server: FakeUpdateServer, tmp_path: Path) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    device = make_device(server, tmp_path, http=httpx.Client(transport=httpx.MockTransport(unreachable)))

    with pytest.raises(TransportError) as failed:
        device.client.check(INSTALLED)

    assert failed.value.code == "unreachable"


def test_a_refused_device_token_is_unauthenticated(server: FakeUpdateServer, tmp_path: Path) -> None:
    device = make_device(server, tmp_path)
    server.credential = DeviceCredential()  # the server now knows another key than the device signs with

    with pytest.raises(Unauthenticated) as refused:
        device.client.check(INSTALLED)

    assert refused.value.code == "token_invalid"


def test_the_fetcher_raises_tufs_http_error_and_carries_the_token(server: FakeUpdateServer) -> None:
    fetcher = HttpxFetcher(server.client(), server.credential)

    with pytest.raises(tuf_errors.DownloadHTTPError) as missing:
        fetcher.download_bytes(f"{BASE_URL}/updates/v1/metadata/9.root.json", 1000)
    data = fetcher.download_bytes(f"{BASE_URL}/updates/v1/metadata/1.root.json", 100_000)

    assert missing.value.status_code == 404
    assert data == server.root_bytes
    assert server.requests[-1].headers["Authorization"].startswith("FleetwardDevice serial=")


def test_a_provisioned_root_that_is_not_self_signed_is_a_configuration_error(
    server: FakeUpdateServer, tmp_path: Path
) -> None:
    root = Metadata.from_bytes(server.root_bytes)
    root.signed.version = 7
    settings = UpdateClientSettings(BASE_URL, tmp_path, DEVICE, PRODUCT)

    with pytest.raises(ConfigurationError):
        UpdateClient(settings, root.to_bytes(), server.credential, http=server.client())
