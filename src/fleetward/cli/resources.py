"""CLI commands that call the API: operators, tokens, tenants, roles, products, groups, devices, the CA."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetward.api import schemas
from fleetward.authority.service import CaKind, RevocationReason
from fleetward.cli.output import console, show_list, show_one
from fleetward.cli.state import State, fail, resolve_tenant
from fleetward.client import FleetwardClient, Model
from fleetward.registry.models import DeviceStatus, OsFeed, Role, UpdatePolicy

TenantOption = Annotated[str | None, typer.Option("--tenant", help="Tenant id or name (else the profile's).")]
MfaCodeOption = Annotated[
    str | None,
    typer.Option("--mfa-code", help="A current code of your authenticator app (when your MFA is on)."),
]


def me(client: FleetwardClient) -> schemas.Me:
    return client.get("/v1/me", schemas.Me)


def query(**values: str | int | None) -> dict[str, str | int]:
    """Query parameters from options, leaving out those not given."""
    return {key: value for key, value in values.items() if value is not None}


def in_tenant(context: typer.Context, tenant: str | None) -> tuple[State, FleetwardClient, str]:
    state: State = context.obj
    client = state.client()
    try:
        return state, client, state.tenant(client, tenant)
    except BaseException:
        client.close()  # the caller's ``with client`` is not reached: do not leak its connection
        raise


def list_in_tenant(
    context: typer.Context,
    tenant: str | None,
    path: str,
    model: type[Model],
    columns: list[str],
    title: str,
    params: dict[str, str | int] | None = None,
) -> None:
    """GET a list under the tenant and show it as a table (or JSON)."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        items = client.get_list(f"/v1/tenants/{tenant_id}{path}", model, params)
    show_list(items, columns, title=title, as_json=state.as_json)


def show_in_tenant(
    context: typer.Context, tenant: str | None, path: str, model: type[Model], title: str
) -> None:
    """GET one thing under the tenant and show it."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.get(f"/v1/tenants/{tenant_id}{path}", model)
    show_one(item, title=title, as_json=state.as_json)


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(name=name, help=help_text, no_args_is_help=True)


operator_app = _group("operator", "Operators: the people who run fleets.")
token_app = _group("token", "API tokens: scoped, expiring, stored only as a hash.")
mfa_app = _group("mfa", "Your MFA: a TOTP authenticator app, needed to create tokens once it is on.")
operator_app.add_typer(mfa_app)
tenant_app = _group("tenant", "Tenants: isolated fleets, each with its own CA.")
role_app = _group("role", "Roles in a tenant: Administrator, Contributor (no deletes), Reader.")
product_app = _group("product", "Products: what a device is; each comes with five default device groups.")
group_app = _group("device-group", "Device groups: which devices get which updates, under which policy.")
device_app = _group("device", "Devices: claim, list, show, move, revoke, quarantine, release, connection.")
certificate_app = _group("certificate", "Operational certificates issued to devices.")
reference_app = _group(
    "reference-value", "Reference values: the software devices may run (name, version, SHA-256)."
)
floor_app = _group("security-floor", "Security floors: the lowest version of a component that may attest.")
ca_app = _group("ca-certificate", "The tenant's CA: chain download and proof of possession.")
event_app = _group("event", "Events: what operators and devices did, and every refusal.")


def register(app: typer.Typer) -> None:
    for sub in (
        operator_app,
        token_app,
        tenant_app,
        role_app,
        product_app,
        group_app,
        device_app,
        certificate_app,
        reference_app,
        floor_app,
        ca_app,
        event_app,
    ):
        app.add_typer(sub)
    app.command("me")(whoami)


def whoami(context: typer.Context) -> None:
    """Who the profile's token belongs to, and its roles."""
    state: State = context.obj
    with state.client() as client:
        show_one(me(client), title="You", as_json=state.as_json)


# ------------------------------------------------------------------ operators and tokens


@operator_app.command("create")
def operator_create(
    context: typer.Context,
    email: str,
    name: Annotated[str, typer.Option(help="Display name.")],
    can_create_tenants: Annotated[bool, typer.Option(help="May create tenants.")] = False,
) -> None:
    """Create an operator; prints its first token once."""
    state: State = context.obj
    with state.client() as client:
        created = client.post(
            "/v1/operators",
            schemas.OperatorCreate(email=email, name=name, can_create_tenants=can_create_tenants),
            schemas.OperatorCreated,
        )
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    show_one(created.operator, title="Operator", as_json=False)
    console.print(f"First token (shown once): [bold]{created.token}[/bold]")


@operator_app.command("list")
def operator_list(context: typer.Context) -> None:
    """List operators."""
    state: State = context.obj
    with state.client() as client:
        items = client.get_list("/v1/operators", schemas.OperatorPublic)
    show_list(
        items,
        ["email", "name", "can_create_tenants", "mfa_enabled", "id"],
        title="Operators",
        as_json=state.as_json,
    )


@operator_app.command("token")
def operator_token(
    context: typer.Context,
    email: str,
    name: Annotated[str, typer.Option(help="What the token is for.")] = "issued by an administrator",
    scopes: Annotated[str, typer.Option(help="Comma-separated: read, write, delete, admin.")] = "read",
    tenant: Annotated[str | None, typer.Option(help="Restrict the token to this tenant.")] = None,
    valid_days: Annotated[int | None, typer.Option(min=1, help="Days until it expires.")] = None,
    mfa_code: MfaCodeOption = None,
) -> None:
    """Give another operator a new token (for when theirs expired); the secret is shown once."""
    state: State = context.obj
    with state.client() as client:
        tenant_id = resolve_tenant(client, tenant) if tenant else None
        created = client.post(
            f"/v1/operators/{email}/tokens",
            schemas.TokenCreate(
                name=name,
                tenant_id=tenant_id,
                scopes=scopes.split(","),
                valid_days=valid_days,
                mfa_code=mfa_code,
            ),
            schemas.TokenCreated,
        )
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    show_one(created.token, title=f"Token for {email}", as_json=False)
    console.print(f"Secret (shown once, hand it over safely): [bold]{created.secret}[/bold]")


@token_app.command("create")
def token_create(
    context: typer.Context,
    name: str,
    scopes: Annotated[str, typer.Option(help="Comma-separated: read, write, delete, admin.")] = "read",
    tenant: Annotated[str | None, typer.Option(help="Restrict the token to this tenant.")] = None,
    valid_days: Annotated[int | None, typer.Option(min=1, help="Days until it expires.")] = None,
    mfa_code: MfaCodeOption = None,
) -> None:
    """Create a token for yourself; the secret is shown once."""
    state: State = context.obj
    with state.client() as client:
        tenant_id = resolve_tenant(client, tenant) if tenant else None
        created = client.post(
            "/v1/tokens",
            schemas.TokenCreate(
                name=name,
                tenant_id=tenant_id,
                scopes=scopes.split(","),
                valid_days=valid_days,
                mfa_code=mfa_code,
            ),
            schemas.TokenCreated,
        )
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    show_one(created.token, title="Token", as_json=False)
    console.print(f"Secret (shown once): [bold]{created.secret}[/bold]")


@token_app.command("list")
def token_list(context: typer.Context) -> None:
    """List your tokens."""
    state: State = context.obj
    with state.client() as client:
        items = client.get_list("/v1/tokens", schemas.TokenPublic)
    show_list(
        items,
        ["id", "name", "tenant_id", "scopes", "expires_at", "revoked_at"],
        title="Tokens",
        as_json=state.as_json,
    )


@token_app.command("revoke")
def token_revoke(context: typer.Context, token_id: str) -> None:
    """Revoke one of your tokens."""
    state: State = context.obj
    with state.client() as client:
        client.delete(f"/v1/tokens/{token_id}")
    console.print(f"token {token_id} revoked")


@mfa_app.command("enroll")
def mfa_enroll(context: typer.Context) -> None:
    """Enrol an authenticator app: prints its secret once. MFA stays pending until `mfa confirm`."""
    state: State = context.obj
    with state.client() as client:
        enrolled = schemas.MfaEnrolled.model_validate_json(client.request("POST", "/v1/me/mfa").content)
    if state.as_json:
        console.print_json(enrolled.model_dump_json())
        return
    console.print("Add this to your authenticator app (shown once; scan it as a QR code or type the secret):")
    console.print(enrolled.otpauth_uri, markup=False, highlight=False, soft_wrap=True)
    console.print(f"Secret (base32): [bold]{enrolled.secret}[/bold]")
    console.print("Then turn MFA on with the code it shows: fleetward operator mfa confirm CODE")


@mfa_app.command("confirm")
def mfa_confirm(context: typer.Context, code: str) -> None:
    """Turn your MFA on with a first code from the authenticator app."""
    state: State = context.obj
    with state.client() as client:
        result = client.post("/v1/me/mfa/confirm", schemas.MfaCode(code=code), schemas.MfaStatusPublic)
    show_one(result, title="MFA", as_json=state.as_json)


@mfa_app.command("disable")
def mfa_disable(
    context: typer.Context, code: Annotated[str, typer.Option("--code", help="A current code of your app.")]
) -> None:
    """Turn your MFA off (or drop a pending enrolment), proven with a current code."""
    state: State = context.obj
    with state.client() as client:
        result = client.post("/v1/me/mfa/disable", schemas.MfaCode(code=code), schemas.MfaStatusPublic)
    show_one(result, title="MFA", as_json=state.as_json)


@mfa_app.command("status")
def mfa_status(context: typer.Context) -> None:
    """Whether your MFA is off, pending confirmation, or on."""
    state: State = context.obj
    with state.client() as client:
        result = client.get("/v1/me/mfa", schemas.MfaStatusPublic)
    show_one(result, title="MFA", as_json=state.as_json)


# ------------------------------------------------------------------ tenants and roles


@tenant_app.command("create")
def tenant_create(context: typer.Context, name: str) -> None:
    """Create a tenant (with its CA hierarchy); you become its Administrator."""
    state: State = context.obj
    with state.client() as client:
        tenant = client.post("/v1/tenants", schemas.TenantCreate(name=name), schemas.TenantPublic)
    show_one(tenant, title="Tenant", as_json=state.as_json)


@tenant_app.command("list")
def tenant_list(context: typer.Context) -> None:
    """List the tenants you hold a role in."""
    state: State = context.obj
    with state.client() as client:
        items = client.get_list("/v1/tenants", schemas.TenantPublic)
    show_list(items, ["name", "id", "created_at"], title="Tenants", as_json=state.as_json)


@tenant_app.command("show")
def tenant_show(context: typer.Context, tenant: TenantOption = None) -> None:
    """Show a tenant."""
    show_in_tenant(context, tenant, "", schemas.TenantPublic, "Tenant")


@tenant_app.command("use")
def tenant_use(context: typer.Context, tenant: str) -> None:
    """Make a tenant the profile's default."""
    state: State = context.obj
    with state.client() as client:
        tenant_id = resolve_tenant(client, tenant)
    state.profile.overridden(tenant=tenant_id).save(state.profile_path)
    console.print(f"default tenant is now {tenant_id}")


@role_app.command("add")
def role_add(
    context: typer.Context,
    email: str,
    role: Annotated[Role, typer.Option(help="The role to give.")],
    tenant: TenantOption = None,
) -> None:
    """Give an operator a role in the tenant (or change it)."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.put(
            f"/v1/tenants/{tenant_id}/roles", schemas.RoleAssign(email=email, role=role), schemas.RolePublic
        )
    show_one(item, title="Role", as_json=state.as_json)


@role_app.command("list")
def role_list(context: typer.Context, tenant: TenantOption = None) -> None:
    """List who holds which role in the tenant."""
    list_in_tenant(context, tenant, "/roles", schemas.RolePublic, ["email", "role", "created_at"], "Roles")


@role_app.command("remove")
def role_remove(context: typer.Context, email: str, tenant: TenantOption = None) -> None:
    """Take an operator's role in the tenant away (a tenant keeps one Administrator)."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        client.delete(f"/v1/tenants/{tenant_id}/roles/{email}")
    console.print(f"{email} holds no role in the tenant any more")


# ------------------------------------------------------------------ products and groups


@product_app.command("create")
def product_create(
    context: typer.Context,
    name: str,
    description: Annotated[str, typer.Option(help="What the product is.")] = "",
    tenant: TenantOption = None,
) -> None:
    """Create a product and its default device groups."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        created = client.post(
            f"/v1/tenants/{tenant_id}/products",
            schemas.ProductCreate(name=name, description=description),
            schemas.ProductCreated,
        )
    if state.as_json:
        console.print_json(created.model_dump_json())
        return
    show_one(created.product, title="Product", as_json=False)
    show_list(
        created.device_groups,
        ["name", "update_policy", "os_feed", "id"],
        title="Device groups",
        as_json=False,
    )


@product_app.command("list")
def product_list(context: typer.Context, tenant: TenantOption = None) -> None:
    """List products."""
    list_in_tenant(
        context, tenant, "/products", schemas.ProductPublic, ["name", "description", "id"], "Products"
    )


@product_app.command("show")
def product_show(context: typer.Context, product: str, tenant: TenantOption = None) -> None:
    """Show a product (by id or name)."""
    show_in_tenant(context, tenant, f"/products/{product}", schemas.ProductPublic, "Product")


@product_app.command("update")
def product_update(
    context: typer.Context,
    product: str,
    description: Annotated[str, typer.Option(help="New description.")],
    tenant: TenantOption = None,
) -> None:
    """Change a product's description."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.patch(
            f"/v1/tenants/{tenant_id}/products/{product}",
            schemas.ProductUpdate(description=description),
            schemas.ProductPublic,
        )
    show_one(item, title="Product", as_json=state.as_json)


@product_app.command("delete")
def product_delete(context: typer.Context, product: str, tenant: TenantOption = None) -> None:
    """Delete a product and its groups (refused while devices belong to it)."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        client.delete(f"/v1/tenants/{tenant_id}/products/{product}")
    console.print(f"product {product} deleted")


@group_app.command("create")
def group_create(
    context: typer.Context,
    name: str,
    product: Annotated[str, typer.Option(help="Product id or name.")],
    description: Annotated[str, typer.Option()] = "",
    update_policy: Annotated[UpdatePolicy, typer.Option()] = UpdatePolicy.UPDATE_ALL,
    os_feed: Annotated[OsFeed, typer.Option()] = OsFeed.RETAIL,
    allow_crash_dumps: Annotated[bool, typer.Option()] = False,
    tenant: TenantOption = None,
) -> None:
    """Create a device group in a product."""
    state, client, tenant_id = in_tenant(context, tenant)
    body = schemas.DeviceGroupCreate(
        product=product,
        name=name,
        description=description,
        update_policy=update_policy,
        os_feed=os_feed,
        allow_crash_dumps=allow_crash_dumps,
    )
    with client:
        item = client.post(f"/v1/tenants/{tenant_id}/device-groups", body, schemas.DeviceGroupPublic)
    show_one(item, title="Device group", as_json=state.as_json)


@group_app.command("list")
def group_list(
    context: typer.Context,
    product: Annotated[str | None, typer.Option(help="Only this product's groups.")] = None,
    tenant: TenantOption = None,
) -> None:
    """List device groups."""
    params: dict[str, str | int] = {"product": product} if product else {}
    list_in_tenant(
        context,
        tenant,
        "/device-groups",
        schemas.DeviceGroupPublic,
        ["name", "update_policy", "os_feed", "allow_crash_dumps", "product_id", "id"],
        "Device groups",
        params,
    )


@group_app.command("show")
def group_show(context: typer.Context, group_id: str, tenant: TenantOption = None) -> None:
    """Show a device group."""
    show_in_tenant(context, tenant, f"/device-groups/{group_id}", schemas.DeviceGroupPublic, "Device group")


@group_app.command("update")
def group_update(
    context: typer.Context,
    group_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    update_policy: Annotated[UpdatePolicy | None, typer.Option()] = None,
    os_feed: Annotated[OsFeed | None, typer.Option()] = None,
    allow_crash_dumps: Annotated[bool | None, typer.Option("--allow-crash-dumps/--no-crash-dumps")] = None,
    tenant: TenantOption = None,
) -> None:
    """Change a device group's name, description, update policy, OS feed or crash-dump setting."""
    state, client, tenant_id = in_tenant(context, tenant)
    body = schemas.DeviceGroupUpdate(
        name=name,
        description=description,
        update_policy=update_policy,
        os_feed=os_feed,
        allow_crash_dumps=allow_crash_dumps,
    )
    with client:
        item = client.patch(
            f"/v1/tenants/{tenant_id}/device-groups/{group_id}", body, schemas.DeviceGroupPublic
        )
    show_one(item, title="Device group", as_json=state.as_json)


@group_app.command("delete")
def group_delete(context: typer.Context, group_id: str, tenant: TenantOption = None) -> None:
    """Delete a device group (refused while devices are in it)."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        client.delete(f"/v1/tenants/{tenant_id}/device-groups/{group_id}")
    console.print(f"device group {group_id} deleted")


# ------------------------------------------------------------------ devices


def _claims_from_file(path: Path) -> list[schemas.DeviceClaimItem]:
    """Devices to claim from a CSV (device_id,public_key_file) or a JSON list of {device_id, public_key}."""
    try:
        if path.suffix == ".json":
            return [schemas.DeviceClaimItem.model_validate(item) for item in json.loads(path.read_text())]
        items = []
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                key_file = (path.parent / row["public_key_file"]).resolve()
                items.append(
                    schemas.DeviceClaimItem(device_id=row["device_id"], public_key=key_file.read_text())
                )
        return items
    except KeyError as error:
        fail(f"{path}: the CSV needs the columns device_id and public_key_file (missing {error})")
    except (OSError, ValueError, TypeError) as error:
        fail(f"{path} does not list devices to claim: {error}")


@device_app.command("claim")
def device_claim(
    context: typer.Context,
    device_id: Annotated[str | None, typer.Argument(help="The device id (64 hex characters).")] = None,
    public_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The device's identity public key, PEM.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Claim many: CSV (device_id,public_key_file) or JSON list."
        ),
    ] = None,
    group_id: Annotated[str | None, typer.Option(help="Put the devices in this group.")] = None,
    tenant: TenantOption = None,
) -> None:
    """Claim devices into the tenant: once, and never a device another tenant holds."""
    if from_file is not None:
        items = _claims_from_file(from_file)
    elif device_id is not None and public_key is not None:
        items = [schemas.DeviceClaimItem(device_id=device_id, public_key=public_key.read_text())]
    else:
        fail("give a DEVICE_ID with --public-key, or --from-file")
    state, client, tenant_id = in_tenant(context, tenant)
    results: list[schemas.ClaimResultPublic] = []
    with client, _progress() as progress:
        task = progress.add_task("claiming", total=len(items))
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            answer = client.post(
                f"/v1/tenants/{tenant_id}/devices/claim",
                schemas.DeviceClaim(devices=chunk, group_id=group_id),
                schemas.ClaimResponse,
            )
            results.extend(answer.results)
            progress.advance(task, len(chunk))
    show_list(results, ["device_id", "outcome", "code", "message"], title="Claims", as_json=state.as_json)
    if any(result.outcome == "refused" for result in results):
        raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@device_app.command("list")
def device_list(
    context: typer.Context,
    group_id: Annotated[str | None, typer.Option()] = None,
    product: Annotated[str | None, typer.Option()] = None,
    status: Annotated[DeviceStatus | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    tenant: TenantOption = None,
) -> None:
    """List devices."""
    params: dict[str, str | int] = {"limit": limit, "offset": offset}
    if group_id:
        params["group_id"] = group_id
    if product:
        params["product"] = product
    if status:
        params["status"] = status.value
    list_in_tenant(
        context,
        tenant,
        "/devices",
        schemas.DevicePublic,
        ["id", "status", "group_id", "last_attested_at", "claimed_at"],
        "Devices",
        params,
    )


@device_app.command("show")
def device_show(context: typer.Context, device_id: str, tenant: TenantOption = None) -> None:
    """Show a device and its latest certificates."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        device = client.get(f"/v1/tenants/{tenant_id}/devices/{device_id}", schemas.DevicePublic)
        certificates = client.get_list(
            f"/v1/tenants/{tenant_id}/certificates",
            schemas.CertificatePublic,
            {"device_id": device_id, "limit": 5},
        )
    if state.as_json:
        console.print_json(
            json.dumps(
                {
                    "device": device.model_dump(mode="json"),
                    "certificates": [item.model_dump(mode="json", exclude={"pem"}) for item in certificates],
                }
            )
        )
        return
    show_one(device, title="Device", as_json=False, hide=("public_key_pem",))
    show_list(
        certificates,
        ["serial", "not_before", "not_after", "revoked_at"],
        title="Latest certificates",
        as_json=False,
    )


@device_app.command("update")
def device_update(
    context: typer.Context,
    device_id: str,
    group_id: Annotated[str | None, typer.Option(help="New group (omit for none).")] = None,
    tenant: TenantOption = None,
) -> None:
    """Move a device to another device group."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.patch(
            f"/v1/tenants/{tenant_id}/devices/{device_id}",
            schemas.DeviceUpdate(group_id=group_id),
            schemas.DevicePublic,
        )
    show_one(item, title="Device", as_json=state.as_json, hide=("public_key_pem",))


@device_app.command("revoke")
def device_revoke(
    context: typer.Context,
    device_id: str,
    reason: Annotated[RevocationReason, typer.Option()] = RevocationReason.UNSPECIFIED,
    tenant: TenantOption = None,
) -> None:
    """Revoke a device: no new certificate, and those it holds go on the CRL."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        answer = client.post(
            f"/v1/tenants/{tenant_id}/devices/{device_id}/revoke",
            schemas.Revoke(reason=reason),
            schemas.RevokedDevice,
        )
    show_one(answer, title="Revoked", as_json=state.as_json)


# ------------------------------------------------------------------ certificates and CA


@certificate_app.command("list")
def certificate_list(
    context: typer.Context,
    device_id: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    tenant: TenantOption = None,
) -> None:
    """List issued certificates, newest first."""
    params: dict[str, str | int] = {"limit": limit}
    if device_id:
        params["device_id"] = device_id
    list_in_tenant(
        context,
        tenant,
        "/certificates",
        schemas.CertificatePublic,
        ["serial", "device_id", "not_after", "revoked_at", "revocation_reason"],
        "Certificates",
        params,
    )


@certificate_app.command("show")
def certificate_show(context: typer.Context, serial: str, tenant: TenantOption = None) -> None:
    """Show a certificate (PEM included)."""
    show_in_tenant(context, tenant, f"/certificates/{serial}", schemas.CertificatePublic, "Certificate")


@certificate_app.command("revoke")
def certificate_revoke(
    context: typer.Context,
    serial: str,
    reason: Annotated[RevocationReason, typer.Option()] = RevocationReason.UNSPECIFIED,
    tenant: TenantOption = None,
) -> None:
    """Revoke one certificate; the CRL is regenerated at once."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.post(
            f"/v1/tenants/{tenant_id}/certificates/{serial}/revoke",
            schemas.Revoke(reason=reason),
            schemas.CertificatePublic,
        )
    show_one(item, title="Certificate", as_json=state.as_json, hide=("pem",))


@ca_app.command("download")
def ca_download(
    context: typer.Context,
    output: Annotated[Path, typer.Option(help="Where to write the PEM chain.")] = Path("ca-chain.pem"),
    crl: Annotated[Path | None, typer.Option(help="Also write the current CRL (DER) here.")] = None,
    tenant: TenantOption = None,
) -> None:
    """Download the tenant's CA chain (issuing CA, then root CA) as PEM."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        output.write_bytes(client.get_bytes(f"/v1/tenants/{tenant_id}/ca/chain"))
        if crl is not None:
            crl.write_bytes(client.get_bytes(f"/v1/tenants/{tenant_id}/crl"))
    console.print(f"CA chain written to {output}" + (f", CRL to {crl}" if crl else ""))


@ca_app.command("list")
def ca_list(context: typer.Context, tenant: TenantOption = None) -> None:
    """List the tenant's CA certificates."""
    list_in_tenant(
        context,
        tenant,
        "/ca/certificates",
        schemas.CaCertificatePublic,
        ["kind", "active", "not_after", "id"],
        "CA certificates",
    )


@ca_app.command("download-proof")
def ca_proof(
    context: typer.Context,
    verification_code: Annotated[str, typer.Option(help="The code the third party gave you.")],
    output: Annotated[Path, typer.Option(help="Where to write the PEM certificate.")] = Path("proof.pem"),
    ca: Annotated[CaKind, typer.Option(help="Which CA signs.")] = CaKind.ROOT,
    tenant: TenantOption = None,
) -> None:
    """Write a proof-of-possession certificate (CN = the verification code) signed by the tenant CA."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        pem = client.post_bytes(
            f"/v1/tenants/{tenant_id}/ca/proof-of-possession",
            schemas.ProofOfPossessionCreate(verification_code=verification_code, ca=ca),
        )
    output.write_bytes(pem)
    console.print(f"proof-of-possession certificate written to {output}")


# ------------------------------------------------------------------ reference values, floors, events


@reference_app.command("add")
def reference_add(
    context: typer.Context,
    component: str,
    version: str,
    sha256: Annotated[str | None, typer.Option(help="SHA-256 of the image, hex.")] = None,
    image: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Or: the image file to hash.")
    ] = None,
    tenant: TenantOption = None,
) -> None:
    """Register a component version devices may run."""
    import hashlib

    if image is not None:
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
    elif sha256 is not None:
        digest = sha256.lower()
    else:
        fail("give --sha256 or --image")
    _state, client, tenant_id = in_tenant(context, tenant)
    body = schemas.ReferenceValuesAdd(
        values=[schemas.ReferenceValueItem(component=component, version=version, sha256=digest)]
    )
    with client:
        added = client.post(f"/v1/tenants/{tenant_id}/reference-values", body, schemas.ReferenceValuesAdded)
    console.print(f"{added.added} reference value(s) added: {component} {version} {digest}")


@reference_app.command("list")
def reference_list(
    context: typer.Context,
    component: Annotated[str | None, typer.Option()] = None,
    tenant: TenantOption = None,
) -> None:
    """List reference values."""
    params: dict[str, str | int] = {"component": component} if component else {}
    list_in_tenant(
        context,
        tenant,
        "/reference-values",
        schemas.ReferenceValueItem,
        ["component", "version", "sha256"],
        "Reference values",
        params,
    )


@reference_app.command("remove")
def reference_remove(
    context: typer.Context, component: str, version: str, sha256: str, tenant: TenantOption = None
) -> None:
    """Remove a reference value: devices running it no longer attest."""
    _state, client, tenant_id = in_tenant(context, tenant)
    with client:
        client.delete(f"/v1/tenants/{tenant_id}/reference-values/{component}/{version}/{sha256}")
    console.print(f"reference value {component} {version} removed")


@floor_app.command("set")
def floor_set(
    context: typer.Context, component: str, minimum_version: str, tenant: TenantOption = None
) -> None:
    """Refuse attestation of COMPONENT below MINIMUM_VERSION from now on."""
    state, client, tenant_id = in_tenant(context, tenant)
    with client:
        item = client.put(
            f"/v1/tenants/{tenant_id}/security-floors/{component}",
            schemas.SecurityFloorSet(minimum_version=minimum_version),
            schemas.SecurityFloorPublic,
        )
    show_one(item, title="Security floor", as_json=state.as_json)


@floor_app.command("list")
def floor_list(context: typer.Context, tenant: TenantOption = None) -> None:
    """List security floors."""
    list_in_tenant(
        context,
        tenant,
        "/security-floors",
        schemas.SecurityFloorPublic,
        ["component", "minimum_version"],
        "Security floors",
    )


@event_app.command("platform")
def event_platform(
    context: typer.Context,
    kind: Annotated[str | None, typer.Option(help="e.g. attestation, operator.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
) -> None:
    """List events of no tenant (operators allowed to create tenants only)."""
    state: State = context.obj
    params: dict[str, str | int] = {"limit": limit}
    if kind:
        params["kind"] = kind
    with state.client() as client:
        items = client.get_list("/v1/events", schemas.EventPublic, params)
    show_list(
        items,
        ["at", "kind", "code", "severity", "device_id", "actor", "detail"],
        title="Events",
        as_json=state.as_json,
    )


@event_app.command("list")
def event_list(
    context: typer.Context,
    device_id: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option(help="e.g. attestation, claim, revocation.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    tenant: TenantOption = None,
    group_id: Annotated[
        str | None, typer.Option(help="Only devices now in this device group (its id).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="At or after this ISO time.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this ISO time.")] = None,
    code: Annotated[str | None, typer.Option(help="e.g. certificate_issued, quarantined.")] = None,
    severity: Annotated[str | None, typer.Option(help="info, warning or critical.")] = None,
) -> None:
    """List the tenant's events, newest first."""
    params: dict[str, str | int] = {"limit": limit}
    if device_id:
        params["device_id"] = device_id
    if kind:
        params["kind"] = kind
    params.update(query(group_id=group_id, since=since, until=until, code=code, severity=severity))
    list_in_tenant(
        context,
        tenant,
        "/events",
        schemas.EventPublic,
        ["at", "kind", "code", "severity", "device_id", "actor", "detail"],
        "Events",
        params,
    )
