"""The image repository and images through the real API (SQLite and PostgreSQL), read by the real
python-tuf client (``tuf.ngclient.Updater``) with a device token, and managed with the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bsdiff4
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater
from typer.testing import CliRunner

from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.api import schemas
from fleetward.api import schemas_images as image_schemas
from fleetward.cli.main import app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.errors import FleetwardError
from fleetward.registry.models import Role
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice
from fleetward.updates.repository import sign_root
from fleetward.wire.updates import (
    FLOORS_FIELD,
    custom_of,
    delta_path,
    device_token,
    product_role,
    target_path,
)

from .conftest import TenantSetup, healthy_software, make_tenant

COMPONENT = "6d0c1f8e-3b2a-4c5d-9e8f-0a1b2c3d4e5f"


def package(version: str, size: int = 4000) -> bytes:
    manifest = Manifest(name="panel-monitor", component_id=COMPONENT, entry_point="bin/app")
    body = b"".join(f"line {i} of version {version}\n".encode() for i in range(size // 20))
    return build_package(
        manifest, {"bin/app": b"#!/bin/sh\necho " + version.encode() + b"\n", "lib/data": body}
    )


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class DeviceFetcher(FetcherInterface):
    """ngclient's fetcher for a device: every request carries the device's token."""

    def __init__(self, http: httpx.Client, device: SimulatedDevice) -> None:
        self.http = http
        self.device = device
        self.urls: list[str] = []

    def token(self) -> str:
        credential = self.device.credential
        assert credential is not None
        return device_token(credential.key, credential.issued.serial, int(time.time()))

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        response = self.http.get(url, headers={"Authorization": self.token()})
        if response.status_code != 200:
            raise DownloadHTTPError(f"{url}: {response.status_code}", response.status_code)
        return iter([response.content])


class Repo:
    """A tenant with an image repository (2-of-3 offline root keys) and an enrolled device."""

    def __init__(self, server: BackgroundServer, tenant: TenantSetup, services: Services) -> None:
        self.server = server
        self.tenant = tenant
        self.services = services
        self.client = tenant.client
        self.base = f"/v1/tenants/{tenant.id}"
        self.root_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
        self.publisher = ec.generate_private_key(ec.SECP256R1())

    def propose(
        self,
        keys: list[ec.EllipticCurvePrivateKey],
        threshold: int,
        rotate_online: bool = False,
        *,
        rotation: bool = False,
    ) -> bytes:
        return self.client.post_bytes(
            f"{self.base}/repository/root-proposal",
            image_schemas.RootProposalCreate(
                root_keys=[pem(key) for key in keys],
                threshold=threshold,
                rotation=rotation,
                rotate_online=rotate_online,
            ),
        )

    def upload_root(self, signed: bytes) -> int:
        answer = self.client.request_json("PUT", f"{self.base}/repository/root", json.loads(signed))
        return image_schemas.RootAccepted.model_validate_json(answer).version

    def init(self) -> None:
        proposal = self.propose(self.root_keys, 2)
        assert self.upload_root(sign_root(proposal, [CryptoSigner(k) for k in self.root_keys[:2]])) == 1

    def add(self, version: str, data: bytes | None = None) -> image_schemas.ImagePublic:
        data = data if data is not None else package(version)
        return self.client.post(
            f"{self.base}/images",
            image_schemas.ImageCreate(
                product_id=self.tenant.product.id,
                version=version,
                package_base64=base64.b64encode(data).decode(),
                signature_base64=base64.b64encode(sign_package(self.publisher, data)).decode(),
            ),
            image_schemas.ImagePublic,
        )

    def enroll(self, device: SimulatedDevice, tenant: TenantSetup | None = None) -> SimulatedDevice:
        (tenant or self.tenant).claim(device)

        async def run() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                await device.enroll(self.server.url, http)

        asyncio.run(run())
        return device

    def updater(
        self, device: SimulatedDevice, directory: Path, http: httpx.Client
    ) -> tuple[Updater, DeviceFetcher]:
        fetcher = DeviceFetcher(http, device)
        directory.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            str(directory / "metadata"),
            f"{self.server.url}/updates/v1/metadata/",
            str(directory / "targets"),
            f"{self.server.url}/updates/v1/targets/",
            fetcher,
            bootstrap=self.client.get_bytes(f"{self.base}/repository/root"),
        )
        return updater, fetcher


@pytest.fixture
def repo(server: BackgroundServer, tenant: TenantSetup, services: Services) -> Repo:
    return Repo(server, tenant, services)


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_the_real_tuf_client_downloads_an_image_and_its_delta_with_consistent_snapshots(
    repo: Repo, tmp_path: Path
) -> None:
    repo.init()
    first = repo.add("1.0.0")
    assert first.target_path == target_path(repo.tenant.product.id, COMPONENT, "1.0.0")
    device = repo.enroll(SimulatedDevice("panel-001", healthy_software()))
    with httpx.Client(timeout=30) as http:
        updater, fetcher = repo.updater(device, tmp_path / "device", http)
        updater.refresh()
        info = updater.get_targetinfo(first.target_path)
        assert info is not None
        assert info.length == first.length
        assert custom_of(info).version == "1.0.0"
        downloaded = updater.download_target(info)
        assert Path(downloaded).read_bytes() == package("1.0.0")
        assert any(f"/{first.sha256}.image.tar" in url for url in fetcher.urls)  # consistent snapshots
        assert any(url.endswith(f"1.{product_role(repo.tenant.product.id)}.json") for url in fetcher.urls)

        second = repo.add("1.1.0")
        updater, _ = repo.updater(device, tmp_path / "device", http)  # a new check, as the agent does
        updater.refresh()
        path = delta_path(repo.tenant.product.id, COMPONENT, "1.1.0", first.sha256)
        delta_info = updater.get_targetinfo(path)
        assert delta_info is not None
        custom = custom_of(delta_info)
        assert custom.delta_base_sha256 == first.sha256
        assert custom.delta_of == second.target_path
        delta = Path(updater.download_target(delta_info, str(tmp_path / "delta"))).read_bytes()
        assert bsdiff4.patch(package("1.0.0"), delta) == package("1.1.0")
        assert len(delta) < second.length

    service = repo.services.images
    image = service.image(repo.tenant.id, second.id)
    listed = service.target_file(repo.tenant.id, image)
    assert listed.hashes == {"sha256": second.sha256}
    assert listed.length == second.length
    assert service.delta_file(repo.tenant.id, first.sha256, image) is not None
    assert service.delta_file(repo.tenant.id, "0" * 64, image) is None
    # the reference value measured launch will check is registered
    values = repo.client.get_list(f"{repo.base}/reference-values", schemas.ReferenceValueItem)
    assert {(v.component, v.version, v.sha256) for v in values} >= {(COMPONENT, "1.1.0", second.sha256)}


def test_targets_resume_with_range_and_unknown_paths_are_404(repo: Repo) -> None:
    repo.init()
    image = repo.add("1.0.0")
    device = repo.enroll(SimulatedDevice("panel-001", healthy_software()))
    name = image.target_path.replace("image.tar", f"{image.sha256}.image.tar")
    url = f"{repo.server.url}/updates/v1/targets/{name}"
    with httpx.Client() as http:
        fetcher = DeviceFetcher(http, device)
        whole = http.get(url, headers={"Authorization": fetcher.token()})
        assert whole.status_code == 200
        assert whole.headers["accept-ranges"] == "bytes"
        tail = http.get(url, headers={"Authorization": fetcher.token(), "Range": "bytes=100-"})
        assert tail.status_code == 206
        assert tail.content == whole.content[100:]
        assert tail.headers["content-range"] == f"bytes 100-{image.length - 1}/{image.length}"
        beyond = http.get(url, headers={"Authorization": fetcher.token(), "Range": f"bytes={image.length}-"})
        assert beyond.status_code == 416
        missing = http.get(url.replace(image.sha256, "0" * 64), headers={"Authorization": fetcher.token()})
        assert missing.status_code == 404
        unknown = http.get(
            f"{repo.server.url}/updates/v1/metadata/1.nothing.json",
            headers={"Authorization": fetcher.token()},
        )
        assert unknown.status_code == 404
        anonymous = http.get(url)
        assert anonymous.status_code == 401
        assert error_code(anonymous) == "token_missing"


def test_a_root_needs_its_threshold_and_a_rotation_the_old_one_too(repo: Repo, tmp_path: Path) -> None:
    proposal = repo.propose(repo.root_keys, 2)
    one = sign_root(proposal, [CryptoSigner(repo.root_keys[0])])
    with pytest.raises(FleetwardError) as refused:
        repo.upload_root(one)
    assert refused.value.code == "root_threshold_not_met"
    repo.init()
    repo.add("1.0.0")
    device = repo.enroll(SimulatedDevice("panel-001", healthy_software()))

    new_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    rotation = repo.propose(new_keys, 2, rotate_online=True, rotation=True)
    assert Metadata[Root].from_bytes(rotation).signed.version == 2
    only_new = sign_root(rotation, [CryptoSigner(k) for k in new_keys])
    with pytest.raises(FleetwardError) as refused_rotation:
        repo.upload_root(only_new)
    assert refused_rotation.value.code == "root_threshold_not_met"
    both = sign_root(only_new, [CryptoSigner(k) for k in repo.root_keys[1:]])
    assert repo.upload_root(both) == 2
    status = repo.client.get(f"{repo.base}/repository", image_schemas.RepositoryStatusPublic)
    assert status.root_version == 2
    assert status.root_threshold == 2

    # a device provisioned with root 1 follows the rotation to root 2 and the new online keys
    with httpx.Client() as http:
        fetcher = DeviceFetcher(http, device)
        directory = tmp_path / "device"
        (directory / "metadata").mkdir(parents=True)
        first_root = fetcher.http.get(
            f"{repo.server.url}/updates/v1/metadata/1.root.json", headers={"Authorization": fetcher.token()}
        ).content
        updater = Updater(
            str(directory / "metadata"),
            f"{repo.server.url}/updates/v1/metadata/",
            str(directory / "targets"),
            f"{repo.server.url}/updates/v1/targets/",
            fetcher,
            bootstrap=first_root,
        )
        updater.refresh()
        assert updater.get_targetinfo(target_path(repo.tenant.product.id, COMPONENT, "1.0.0")) is not None
    assert repo.services.images.root(repo.tenant.id).version == 2


def test_a_first_root_is_refused_once_there_is_a_root_and_a_rotation_while_there_is_none(repo: Repo) -> None:
    with pytest.raises(FleetwardError) as early:
        repo.propose(repo.root_keys, 2, rotation=True)
    assert early.value.code == "repository_not_initialized"
    repo.init()
    # a second "first" root naming only one of the keys, which that key alone would meet: refused, so that
    # `repo init` cannot replace the root behind the operator's back
    with pytest.raises(FleetwardError) as again:
        repo.propose(repo.root_keys[:1], 1)
    assert again.value.code == "repository_initialized"
    assert "rotate-root" in again.value.message
    root = repo.services.images.root(repo.tenant.id)
    assert (root.version, len(root.roles[Root.type].keyids)) == (1, 3)
    assert Metadata[Root].from_bytes(repo.propose(repo.root_keys, 2, rotation=True)).signed.version == 2


def test_the_timestamp_is_signed_again_on_read_when_half_its_life_is_gone(
    repo: Repo, services: Services, clock: FakeClock
) -> None:
    repo.init()
    images = services.images
    before = Metadata.from_bytes(images.metadata(repo.tenant.id, "timestamp.json")).signed.version
    assert Metadata.from_bytes(images.metadata(repo.tenant.id, "timestamp.json")).signed.version == before
    clock.advance(13 * 3600)
    after = Metadata.from_bytes(images.metadata(repo.tenant.id, "timestamp.json")).signed
    assert after.version == before + 1
    assert after.expires > clock.now()
    clock.advance(4 * 24 * 3600)  # the snapshot too
    timestamp = Metadata[Timestamp].from_bytes(images.metadata(repo.tenant.id, "timestamp.json")).signed
    assert timestamp.snapshot_meta.version == 2


def test_floors_are_published_in_the_product_role(repo: Repo) -> None:
    repo.init()
    repo.add("1.0.0")
    repo.client.put(
        f"{repo.base}/security-floors/{COMPONENT}",
        schemas.SecurityFloorSet(minimum_version="1.0.0"),
        schemas.SecurityFloorPublic,
    )
    role = product_role(repo.tenant.product.id)
    latest = repo.services.images.metadata(repo.tenant.id, "timestamp.json")
    current = Metadata.from_bytes(latest).signed.snapshot_meta.version  # type: ignore[attr-defined]
    meta = Metadata.from_bytes(repo.services.images.metadata(repo.tenant.id, f"{current}.snapshot.json"))
    version = meta.signed.meta[f"{role}.json"].version  # type: ignore[attr-defined]
    product = Metadata[Targets].from_bytes(
        repo.services.images.metadata(repo.tenant.id, f"{version}.{role}.json")
    )
    assert product.signed.unrecognized_fields[FLOORS_FIELD] == {COMPONENT: "1.0.0"}


def test_duplicate_versions_conflict_and_bad_packages_are_refused(repo: Repo) -> None:
    with pytest.raises(FleetwardError) as early:
        repo.add("1.0.0")
    assert early.value.code == "repository_not_initialized"
    repo.init()
    repo.add("1.0.0")
    with pytest.raises(FleetwardError) as duplicate:
        repo.add("1.0.0")
    assert duplicate.value.code == "image_exists"
    with pytest.raises(FleetwardError) as garbage:
        repo.add("2.0.0", b"not a tar at all" * 100)
    assert garbage.value.code == "package_malformed"


def test_a_reader_may_not_publish_images_or_change_the_root(
    repo: Repo, server: BackgroundServer, admin: FleetwardClient
) -> None:
    repo.init()
    created = admin.post(
        "/v1/operators",
        schemas.OperatorCreate(email="reader@example.com", name="reader"),
        schemas.OperatorCreated,
    )
    admin.put(
        f"{repo.base}/roles",
        schemas.RoleAssign(email="reader@example.com", role=Role.READER),
        schemas.RolePublic,
    )
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {created.token}"}) as http:
        assert http.get(f"{repo.base}/repository").status_code == 200
        assert http.get(f"{repo.base}/images").status_code == 200
        data = package("1.0.0")
        upload = http.post(
            f"{repo.base}/images",
            json={
                "product_id": repo.tenant.product.id,
                "version": "1.0.0",
                "package_base64": base64.b64encode(data).decode(),
                "signature_base64": base64.b64encode(sign_package(repo.publisher, data)).decode(),
            },
        )
        assert upload.status_code == 403
        assert error_code(upload) == "role_forbids"
        proposal = http.post(
            f"{repo.base}/repository/root-proposal",
            json={"root_keys": [pem(repo.root_keys[0])], "threshold": 1},
        )
        assert proposal.status_code == 403
        assert error_code(proposal) == "role_forbids"
        put = http.put(f"{repo.base}/repository/root", content=b"{}")
        assert put.status_code == 403


def test_another_tenants_device_cannot_read_this_tenants_repository(
    repo: Repo, admin: FleetwardClient
) -> None:
    repo.init()
    image = repo.add("1.0.0")
    other = make_tenant(admin, "other-farm")
    stranger = repo.enroll(SimulatedDevice("stranger", healthy_software()), other)
    own = repo.enroll(SimulatedDevice("panel-001", healthy_software()))
    name = image.target_path.replace("image.tar", f"{image.sha256}.image.tar")
    with httpx.Client(base_url=repo.server.url) as http:
        for path in ("/updates/v1/metadata/1.root.json", f"/updates/v1/targets/{name}"):
            ok = http.get(path, headers={"Authorization": DeviceFetcher(http, own).token()})
            assert ok.status_code == 200, path
            refused = http.get(path, headers={"Authorization": DeviceFetcher(http, stranger).token()})
            assert refused.status_code == 404, path  # it sees its own tenant's repository, which has neither
        # a quarantined device still reads it: an update is how it is remediated
        repo.client.request_json("POST", f"{repo.base}/devices/{own.device_id}/quarantine", {})
        quarantined = http.get(
            "/updates/v1/metadata/1.root.json", headers={"Authorization": DeviceFetcher(http, own).token()}
        )
        assert quarantined.status_code == 200
        # a revoked device is refused at once
        assert own.credential is not None
        repo.client.request_json("POST", f"{repo.base}/devices/{own.device_id}/revoke", {})
        revoked = http.get(
            "/updates/v1/metadata/1.root.json", headers={"Authorization": DeviceFetcher(http, own).token()}
        )
        assert revoked.status_code == 401
        assert error_code(revoked) in {
            "certificate_revoked",
            "device_not_active",
        }
        # a forged token is refused
        forged = device_token(
            ec.generate_private_key(ec.SECP256R1()), own.credential.issued.serial, int(time.time())
        )
        assert (
            http.get("/updates/v1/metadata/1.root.json", headers={"Authorization": forged}).status_code == 401
        )


def test_a_token_without_the_key_learns_nothing_of_a_serial(repo: Repo) -> None:
    """The signature is checked before the certificate's standing: an unknown serial and a revoked one
    answer a forged token as a bad signature does; only the key's holder hears that it is revoked."""
    repo.init()
    device = repo.enroll(SimulatedDevice("panel-001", healthy_software()))
    assert device.credential is not None
    serial = device.credential.issued.serial
    stranger = ec.generate_private_key(ec.SECP256R1())
    path = "/updates/v1/metadata/1.root.json"
    with httpx.Client(base_url=repo.server.url) as http:

        def code(header: str) -> tuple[int, str]:
            response = http.get(path, headers={"Authorization": header})
            return response.status_code, error_code(response)

        now = int(time.time())
        unknown = "f" * len(serial) if serial != "f" * len(serial) else "e" * len(serial)
        assert code(device_token(stranger, unknown, now)) == (401, "token_invalid")
        assert code(device_token(stranger, serial, now)) == (401, "token_invalid")
        repo.client.request_json("POST", f"{repo.base}/devices/{device.device_id}/revoke", {})
        assert code(device_token(stranger, serial, now)) == (401, "token_invalid")
        assert code(device_token(device.credential.key, serial, now))[1] in {
            "certificate_revoked",
            "device_not_active",
        }


def test_the_cli_creates_keys_inits_the_repository_and_adds_an_image(
    repo: Repo, server: BackgroundServer, admin_token: str, tmp_path: Path
) -> None:
    env: dict[str, Any] = {
        "FLEETWARD_CLI_CONFIG": str(tmp_path / "cli.json"),
        "FLEETWARD_KEY_PASSPHRASE": "s3cret",
    }
    base = ["--url", server.url, "--token", admin_token, "--tenant", repo.tenant.id]

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, [*base, *args], env=env)
        assert result.exit_code == 0, f"{args}: {result.output}{result.exception!r}"
        return result.stdout

    keys = [tmp_path / f"root{i}.pem" for i in range(3)]
    for key in keys:
        run("repo", "root-key", "create", "--out", str(key))
        assert key.stat().st_mode & 0o777 == 0o600
        assert b"ENCRYPTED" in key.read_bytes()
    run("repo", "init", "--root-key", str(keys[0]), "--root-key", str(keys[1]), "--threshold", "2")
    status = json.loads(run("--json", "repo", "status"))
    assert status["root_version"] == 1
    assert status["root_threshold"] == 2
    again = CliRunner().invoke(
        app, [*base, "repo", "init", "--root-key", str(keys[2]), "--threshold", "1"], env=env
    )
    assert again.exit_code == 1
    assert "already initialised: use `fleetward repo rotate-root`" in " ".join(again.output.split())
    assert json.loads(run("--json", "repo", "status"))["root_keyids"] == status["root_keyids"]
    run(
        "repo",
        "rotate-root",
        "--root-key",
        str(keys[0]),
        "--root-key",
        str(keys[1]),
        "--new-root-key",
        str(keys[2]),
        "--threshold",
        "1",
        "--rotate-online",
    )
    run("repo", "root", "--out", str(tmp_path / "root.json"))
    assert Metadata[Root].from_bytes((tmp_path / "root.json").read_bytes()).signed.version == 2

    app_dir = tmp_path / "app"
    (app_dir / "bin").mkdir(parents=True)
    manifest = Manifest(name="panel-monitor", component_id=COMPONENT, entry_point="bin/app")
    (app_dir / "manifest.json").write_bytes(manifest.to_json())
    (app_dir / "bin" / "app").write_bytes(b"#!/bin/sh\necho hi\n")
    (app_dir / "bin" / "app").chmod(0o755)
    publisher = tmp_path / "publisher.pem"
    run("repo", "root-key", "create", "--out", str(publisher))
    run(
        "image",
        "add",
        str(app_dir),
        "--product",
        "panel-controller",
        "--version",
        "2.0",
        "--publisher-key",
        str(publisher),
    )
    listed = json.loads(CliRunner().invoke(app, [*base, "--json", "image", "list"], env=env).stdout)
    assert [item["version"] for item in listed] == ["2.0"]
    shown = json.loads(
        CliRunner().invoke(app, [*base, "--json", "image", "show", listed[0]["id"]], env=env).stdout
    )
    assert shown["component_id"] == COMPONENT
    for group in (["repo"], ["image"], ["repo", "init"], ["image", "add"]):
        assert CliRunner().invoke(app, [*group, "--help"], env=env).exit_code == 0
    helped = CliRunner().invoke(app, ["image", "add", "--help"], env=env, terminal_width=200).output
    assert "from each of the latest earlier versions" in " ".join(helped.replace("│", " ").split())


def test_a_device_of_no_product_reads_no_product_role_and_no_target(repo: Repo) -> None:
    """Default deny: a device claimed without a group (so without a product) sees the tenant's top-level
    metadata, which names no image, and nothing of any product."""
    repo.init()
    image = repo.add("1.0.0")
    loose = SimulatedDevice("loose", healthy_software())
    repo.client.post(
        f"{repo.base}/devices/claim",
        schemas.DeviceClaim(devices=[loose.claim_item()]),
        schemas.ClaimResponse,
    )

    async def enroll() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            await loose.enroll(repo.server.url, http)

    asyncio.run(enroll())
    name = image.target_path.replace("image.tar", f"{image.sha256}.image.tar")
    with httpx.Client(base_url=repo.server.url) as http:
        token = DeviceFetcher(http, loose).token()
        assert (
            http.get("/updates/v1/metadata/1.root.json", headers={"Authorization": token}).status_code == 200
        )
        role = http.get(
            f"/updates/v1/metadata/1.product-{image.product_id}.json", headers={"Authorization": token}
        )
        assert role.status_code == 404
        assert http.get(f"/updates/v1/targets/{name}", headers={"Authorization": token}).status_code == 404
