"""CLI commands for the image repository (``fleetward repo``) and images (``fleetward image``).

The offline root keys never leave the operator's machine: ``repo init`` and ``repo rotate-root`` fetch the
root the server proposes, sign it here with the key files given, and upload only the signatures.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from securesystemslib.signer import CryptoSigner, SSlibKey

from fleetward.agent.manifest import parse_manifest
from fleetward.agent.package import MANIFEST_NAME, build_package, sign_package
from fleetward.api import schemas
from fleetward.api import schemas_images as image_schemas
from fleetward.cli.output import console, show_list, show_one
from fleetward.cli.resources import TenantOption, in_tenant, list_in_tenant, query, show_in_tenant
from fleetward.cli.state import fail
from fleetward.errors import FleetwardError
from fleetward.updates.repository import sign_root
from fleetward.wire.updates import ImageKind

repo_app = typer.Typer(
    name="repo",
    help="The tenant's TUF image repository: offline root keys, the root, its status.",
    no_args_is_help=True,
)
key_app = typer.Typer(
    name="root-key", help="Offline root keys (ECDSA P-256 key files).", no_args_is_help=True
)
repo_app.add_typer(key_app)
image_app = typer.Typer(
    name="image",
    help="Images: signed application (or agent) packages published to devices.",
    no_args_is_help=True,
)

PASSPHRASE_ENV = "FLEETWARD_KEY_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret
PassphraseEnv = Annotated[
    str,
    typer.Option(help="Environment variable holding the key files' passphrase (unset: not encrypted)."),
]
MAX_KEY_FILE_BYTES = 16 * 1024


def register(app: typer.Typer) -> None:
    app.add_typer(repo_app)
    app.add_typer(image_app)


# ------------------------------------------------------------------ key files


def _passphrase(variable: str) -> bytes | None:
    value = os.environ.get(variable)
    return value.encode("utf-8") if value else None


def load_private_key(path: Path, passphrase_env: str = PASSPHRASE_ENV) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 private key from a PEM file (encrypted if the passphrase variable is set)."""
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            fail(f"{path} is too large to be a key file")
        key = serialization.load_pem_private_key(path.read_bytes(), password=_passphrase(passphrase_env))
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror}")
    except (ValueError, TypeError) as error:
        fail(f"{path} is not a PEM private key (or the passphrase in ${passphrase_env} is wrong): {error}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        fail(f"{path} is not an ECDSA P-256 key")
    return key


def load_public_key_pem(path: Path) -> str:
    """A PEM public key file (or the public half of a private key file)."""
    try:
        data = path.read_bytes()[:MAX_KEY_FILE_BYTES]
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror}")
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        public = load_private_key(path).public_key()
    return _pem(public)


def _pem(public: PublicKeyTypes) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@key_app.command("create")
def root_key_create(
    out: Annotated[Path, typer.Option("--out", help="The key file to write (mode 0600; must not exist).")],
    passphrase_env: PassphraseEnv = PASSPHRASE_ENV,
) -> None:
    """Create an offline root key (ECDSA P-256, PKCS#8 PEM). Keep it off the server: it signs roots."""
    key = ec.generate_private_key(ec.SECP256R1())
    passphrase = _passphrase(passphrase_env)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    try:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        fail(f"{out} exists: a key file is never overwritten")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    keyid = SSlibKey.from_crypto(key.public_key()).keyid
    console.print(f"Root key written to [bold]{out}[/bold] (mode 0600{', encrypted' if passphrase else ''}).")
    console.print(f"key id {keyid}")


# ------------------------------------------------------------------ the root


def _propose_sign_upload(
    context: typer.Context,
    tenant: str | None,
    root_public_keys: list[str],
    signing_keys: list[ec.EllipticCurvePrivateKey],
    threshold: int,
    rotate_online: bool,
    *,
    rotation: bool,
) -> None:
    state, client, tenant_id = in_tenant(context, tenant)
    base = f"/v1/tenants/{tenant_id}/repository"
    with client:
        initialized = client.get(base, image_schemas.RepositoryStatusPublic).initialized
        if initialized and not rotation:
            fail(ALREADY_INITIALIZED)
        if not initialized and rotation:
            fail(NOT_INITIALIZED)
        try:
            proposal = client.post_bytes(
                f"{base}/root-proposal",
                image_schemas.RootProposalCreate(
                    root_keys=list(dict.fromkeys(root_public_keys)),
                    threshold=threshold,
                    rotation=rotation,
                    rotate_online=rotate_online,
                ),
            )
        except FleetwardError as error:  # another operator got there between the status and the proposal
            if error.code == "repository_initialized":
                fail(ALREADY_INITIALIZED)
            raise
        try:
            signed = sign_root(proposal, [CryptoSigner(key) for key in signing_keys])
        except FleetwardError as error:
            fail(str(error))
        answer = client.request_json("PUT", f"{base}/root", json.loads(signed))
    accepted = image_schemas.RootAccepted.model_validate_json(answer)
    if state.as_json:
        console.print_json(accepted.model_dump_json())
        return
    console.print(
        f"Root version [bold]{accepted.version}[/bold] accepted: {threshold} of {len(set(root_public_keys))} "
        "offline key(s) must sign the next one."
    )


ALREADY_INITIALIZED = (
    "the image repository is already initialised: use `fleetward repo rotate-root` to change its root"
)
NOT_INITIALIZED = "the image repository has no root yet: run `fleetward repo init`"

RootKeys = Annotated[
    list[Path], typer.Option("--root-key", help="An offline root key file (repeat for each key you hold).")
]
RootPublicKeys = Annotated[
    list[Path] | None,
    typer.Option("--root-public-key", help="A root key's public half only (PEM), held by someone else."),
]


@repo_app.command("init")
def repo_init(
    context: typer.Context,
    root_key: RootKeys,
    threshold: Annotated[int, typer.Option(min=1, max=16, help="How many root keys must sign a root.")],
    root_public_key: RootPublicKeys = None,
    passphrase_env: PassphraseEnv = PASSPHRASE_ENV,
    tenant: TenantOption = None,
) -> None:
    """Create the image repository: the server proposes a root naming its online keys, the key files sign
    it here (at least THRESHOLD of them), and the signed root is uploaded. Refused once the repository
    has a root: `repo rotate-root` changes it."""
    keys = [load_private_key(path, passphrase_env) for path in root_key]
    publics = [_pem(key.public_key()) for key in keys] + [
        load_public_key_pem(p) for p in root_public_key or []
    ]
    _propose_sign_upload(context, tenant, publics, keys, threshold, rotate_online=False, rotation=False)


@repo_app.command("rotate-root")
def repo_rotate_root(
    context: typer.Context,
    root_key: Annotated[
        list[Path], typer.Option("--root-key", help="A current root key file (enough for its threshold).")
    ],
    new_root_key: Annotated[
        list[Path],
        typer.Option("--new-root-key", help="A key file of the new root (may repeat a current one)."),
    ],
    threshold: Annotated[int, typer.Option(min=1, max=16, help="How many new root keys must sign a root.")],
    new_root_public_key: Annotated[
        list[Path] | None, typer.Option("--new-root-public-key", help="A new root key's public half only.")
    ] = None,
    rotate_online: Annotated[
        bool,
        typer.Option(help="Also replace the server's online keys (targets, snapshot, timestamp, director)."),
    ] = False,
    passphrase_env: PassphraseEnv = PASSPHRASE_ENV,
    tenant: TenantOption = None,
) -> None:
    """Replace the root: signed by the current root's threshold and by the new root's threshold."""
    old = [load_private_key(path, passphrase_env) for path in root_key]
    new = [load_private_key(path, passphrase_env) for path in new_root_key]
    publics = [_pem(key.public_key()) for key in new] + [
        load_public_key_pem(p) for p in new_root_public_key or []
    ]
    _propose_sign_upload(context, tenant, publics, [*old, *new], threshold, rotate_online, rotation=True)


@repo_app.command("root")
def repo_root(
    context: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Where to write the current root (root.json).")],
    tenant: TenantOption = None,
) -> None:
    """Download the current root: what devices are provisioned with as their trusted root."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        data = client.get_bytes(f"/v1/tenants/{tenant_id}/repository/root")
    out.write_bytes(data)
    console.print(f"Root written to [bold]{out}[/bold] ({len(data)} bytes).")


@repo_app.command("status")
def repo_status(context: typer.Context, tenant: TenantOption = None) -> None:
    """The root (version, threshold, keys, expiry) and the current version and expiry of every role."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        status = client.get(f"/v1/tenants/{tenant_id}/repository", image_schemas.RepositoryStatusPublic)
    if state.as_json:
        console.print_json(status.model_dump_json())
        return
    if not status.initialized:
        console.print("The image repository has no root yet: run `fleetward repo init`.")
        return
    show_one(status, title="Image repository", as_json=False, hide=("roles",))
    show_list(status.roles, ["role", "version", "expires"], title="Roles", as_json=False)


# ------------------------------------------------------------------ images


def _package_directory(directory: Path) -> bytes:
    """A package from a directory holding manifest.json and the application's files."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        fail(f"{directory} has no {MANIFEST_NAME}")
    try:
        manifest = parse_manifest(manifest_path.read_bytes())
    except FleetwardError as error:
        fail(f"{manifest_path}: {error}")
    files: dict[str, bytes] = {}
    executables: list[str] = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            fail(f"{path} is a symbolic link: a package holds regular files only")
        if not path.is_file() or path == manifest_path:
            continue
        name = path.relative_to(directory).as_posix()
        files[name] = path.read_bytes()
        if path.stat().st_mode & 0o111:
            executables.append(name)
    try:
        return build_package(manifest, files, executables=executables)
    except ValueError as error:
        fail(str(error))


@image_app.command("add")
def image_add(
    context: typer.Context,
    package: Annotated[Path, typer.Argument(help="A package (.tar) or a directory with manifest.json.")],
    product: Annotated[str, typer.Option(help="The product (id or name) the image is for.")],
    version: Annotated[str, typer.Option(help="The image's version: 1 to 4 dotted numbers, e.g. 1.4.2.")],
    publisher_key: Annotated[
        Path, typer.Option(help="The publisher's ECDSA P-256 key file: signs the package.")
    ],
    kind: Annotated[ImageKind, typer.Option(help="app, or agent for the agent itself.")] = ImageKind.APP,
    passphrase_env: PassphraseEnv = PASSPHRASE_ENV,
    tenant: TenantOption = None,
) -> None:
    """Publish an image: sign the package with the publisher key and add it to the image repository (its
    reference value is registered, and a delta is published from each of the latest earlier versions of
    the component, the server's image_delta_bases (3 by default), where it is smaller than the image)."""
    data = _package_directory(package) if package.is_dir() else _read_package(package)
    signature = sign_package(load_private_key(publisher_key, passphrase_env), data)
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        product_id = client.get(f"/v1/tenants/{tenant_id}/products/{product}", schemas.ProductPublic).id
        image = client.post(
            f"/v1/tenants/{tenant_id}/images",
            image_schemas.ImageCreate(
                product_id=product_id,
                version=version,
                kind=kind,
                package_base64=base64.b64encode(data).decode("ascii"),
                signature_base64=base64.b64encode(signature).decode("ascii"),
            ),
            image_schemas.ImagePublic,
        )
    show_one(image, title="Image published", as_json=state.as_json)


def _read_package(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror}")


@image_app.command("list")
def image_list(
    context: typer.Context,
    product: Annotated[str | None, typer.Option(help="Only this product's images (its id).")] = None,
    component: Annotated[str | None, typer.Option(help="Only this component's images (its id).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    tenant: TenantOption = None,
) -> None:
    """The tenant's images, newest first."""
    list_in_tenant(
        context,
        tenant,
        "/images",
        image_schemas.ImagePublic,
        ["version", "component_id", "kind", "product_id", "length", "id"],
        "Images",
        query(product_id=product, component_id=component, limit=limit),
    )


@image_app.command("show")
def image_show(context: typer.Context, image_id: str, tenant: TenantOption = None) -> None:
    """One image: its component, version, SHA-256, length and target path."""
    show_in_tenant(context, tenant, f"/images/{image_id}", image_schemas.ImagePublic, "Image")
