"""``fleetward audit-log``: verify a tenant's audit chain on the server, export it as JSON lines, and verify
an exported file with no server at all (ADR 0016).

Exit status: 0 the chain verified, 1 it did not (the first bad entry and why are printed), 2 it could not be
verified (the server unreachable, a file that is not an export, …).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

import httpx
import typer

from fleetward.api import schemas
from fleetward.cli.output import console
from fleetward.cli.resources import TenantOption, in_tenant
from fleetward.cli.state import State, fail
from fleetward.client import FleetwardClient
from fleetward.errors import InvalidInput
from fleetward.store.audit_chain import (
    GENESIS,
    HEAD_HEADER,
    MAX_LINE_BYTES,
    ChainEntry,
    ChainPosition,
    Verification,
    from_json_line,
    parse_position,
    verify,
)
from fleetward.transport import check, network_error

#: entries asked for per export request (the server streams at most 100,000 per request)
EXPORT_PAGE = 10_000

audit_log_app = typer.Typer(
    name="audit-log",
    help="The tamper-evident audit log: every event, hash-chained per tenant. Verify it, export it.",
    no_args_is_help=True,
)

PlatformOption = Annotated[
    bool, typer.Option("--platform", help="The chain of events of no tenant (platform operators only).")
]
AnchorOption = Annotated[
    str | None,
    typer.Option("--anchor", help="SEQ:HASH kept from an earlier export: the chain must still hold it."),
]


def register(app: typer.Typer) -> None:
    app.add_typer(audit_log_app)


def _anchor(text: str | None) -> ChainPosition | None:
    if text is None:
        return None
    try:
        return parse_position(text)
    except ValueError as error:
        fail(str(error), code=2)


def _base(context: typer.Context, tenant: str | None, platform: bool) -> tuple[State, FleetwardClient, str]:
    """The client and the path of the chain: the tenant's, or the platform's with ``--platform``."""
    if platform:
        if tenant is not None:
            fail("give --tenant or --platform, not both", code=2)
        state: State = context.obj
        return state, state.client(), "/v1/audit-log"
    state, client, tenant_id = in_tenant(context, tenant)
    return state, client, f"/v1/tenants/{tenant_id}/audit-log"


def _say(line: str, *, error: bool = False) -> None:
    """One line as is: no wrapping of hashes, no markup in details."""
    typer.echo(line, err=error)


def _report(verification: schemas.AuditVerificationPublic, as_json: bool) -> None:
    if as_json:
        console.print_json(verification.model_dump_json())
    elif verification.ok:
        head = verification.last_verified or verification.head
        at = f"; head {head.seq}:{head.hash}" if head else ""
        chain = verification.chain or '"" (no tenant)'
        _say(f"ok: {verification.entries_checked} entries of chain {chain} verified{at}")
    else:
        _say(
            f"TAMPERED: entry {verification.first_bad_seq}: {verification.problem}: {verification.detail} "
            f"({verification.entries_checked} entries verified before it)"
        )
    if not verification.ok:
        raise typer.Exit(1)


@audit_log_app.command("verify")
def verify_command(
    context: typer.Context,
    tenant: TenantOption = None,
    platform: PlatformOption = False,
    anchor: AnchorOption = None,
) -> None:
    """Verify the chain on the server: every entry, its head, and the anchor if given. Exit 1 if tampered."""
    anchored = _anchor(anchor)
    state, client, path = _base(context, tenant, platform)
    params: dict[str, str | int] = {"anchor": str(anchored)} if anchored else {}
    with client:
        verification = client.get(f"{path}/verify", schemas.AuditVerificationPublic, params)
    _report(verification, state.as_json)


@audit_log_app.command("export")
def export_command(
    context: typer.Context,
    tenant: TenantOption = None,
    platform: PlatformOption = False,
    after_seq: Annotated[int, typer.Option(min=0, help="Only the entries after this position.")] = 0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: standard output).")
    ] = None,
) -> None:
    """Write the chain as JSON lines; the head (SEQ:HASH) goes to standard error: keep it as an anchor."""
    _state, client, path = _base(context, tenant, platform)
    with client:
        if output is None:
            last = _export(client, path, after_seq, typer.get_binary_stream("stdout"))
        else:
            partial = output.with_name(output.name + ".partial")
            with partial.open("wb") as sink:
                last = _export(client, path, after_seq, sink)
                sink.flush()
                os.fsync(sink.fileno())
            partial.replace(output)
    if last is None:
        _say("the chain has no entries yet", error=True)
    else:
        _say(f"head {last}", error=True)


def _export(client: FleetwardClient, path: str, after_seq: int, sink: BinaryIO) -> ChainPosition | None:
    """Page through the export, writing each line as it comes; the last position written (else the head
    the server named: nothing was after ``after_seq``)."""
    url = f"{client.url}{path}"
    last: ChainPosition | None = None
    while True:
        params = {"after_seq": str(after_seq), "limit": str(EXPORT_PAGE)}
        try:
            with client.stream("GET", url, params) as response:
                if not response.is_success:
                    response.read()
                    check(response)
                header = response.headers.get(HEAD_HEADER)
                head = None if header is None else _header_position(header)
                count = 0
                for number, line in enumerate(_lines(response.iter_bytes()), start=1):
                    entry = _parse(line, f"line {number} of the answer")
                    sink.write(line + b"\n")
                    last, count = entry.position, count + 1
        except httpx.HTTPError as error:
            raise network_error(error, url) from None
        if last is None or head is None or count < EXPORT_PAGE or last.seq >= head.seq:
            return last if last is not None else head
        after_seq = last.seq


def _header_position(header: str) -> ChainPosition:
    try:
        return parse_position(header)
    except ValueError:
        raise InvalidInput(f"the server sent a malformed {HEAD_HEADER} header", code="bad_head") from None


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream (without their newline), none longer than an audit line may be."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
        if len(pending) > MAX_LINE_BYTES:
            raise InvalidInput(f"an audit line is longer than {MAX_LINE_BYTES} bytes", code="bad_audit_line")
    if pending:
        yield pending


def _parse(line: bytes, where: str) -> ChainEntry:
    try:
        return from_json_line(line)
    except ValueError as error:
        raise InvalidInput(f"{where} is not an audit entry: {error}", code="bad_audit_line") from None


def _file_chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(64 * 1024):
        yield chunk


@audit_log_app.command("verify-file")
def verify_file_command(
    context: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An export (JSON lines).")],
    anchor: AnchorOption = None,
) -> None:
    """Verify an exported file offline: every entry and its link to the one before (and the anchor).

    A file that starts after entry 1 (``export --after-seq``) is verified from its first entry's previous
    hash; give the anchor you kept at that position to tie it to what you verified before.
    """
    state: State = context.obj
    anchored = _anchor(anchor)
    try:
        found, chain = _verify_file(file, anchored)
    except InvalidInput as error:
        fail(str(error), code=2)
    _report(_public(found, chain), state.as_json)


def _verify_file(file: Path, anchor: ChainPosition | None) -> tuple[Verification, str]:
    with file.open("rb") as handle:
        entries = (
            _parse(line, f"line {number} of {file}")
            for number, line in enumerate(_lines(_file_chunks(handle)), start=1)
        )
        first = next(entries, None)
        if first is None:
            return verify([], anchor=anchor), ""
        start = GENESIS if first.seq == 1 else ChainPosition(first.seq - 1, first.prev_hash)
        return verify(itertools.chain([first], entries), anchor=anchor, start=start), first.chain


def _public(found: Verification, chain: str) -> schemas.AuditVerificationPublic:
    last = found.last_good
    position = None if last is None else schemas.AuditPositionPublic(seq=last.seq, hash=last.hash)
    return schemas.AuditVerificationPublic(
        ok=found.ok,
        chain=chain,
        entries_checked=found.checked,
        head=None,
        last_verified=position,
        problem=found.problem,
        first_bad_seq=found.first_bad_seq,
        detail=found.detail,
    )
