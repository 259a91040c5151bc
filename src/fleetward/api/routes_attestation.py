"""Device routes: ask for a nonce, present evidence with a CSR, get a 24-hour certificate.

These two routes are the hot path. Their logic lives in :func:`answer_nonce` and :func:`answer_certificate`,
which take and return raw JSON bytes. The device lane (``device_lane.py``) calls them straight from ASGI;
the FastAPI declarations below call the same functions and give the OpenAPI document its schemas. The
store's work is group-committed by the enrollment batcher, and every refusal, malformed input included,
is recorded as an event with the next batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from fleetward.api.limits import BodyTooLarge
from fleetward.authority.service import AuthorityService, EnrollmentWork, Refusal
from fleetward.errors import FleetwardError, InvalidInput, PayloadTooLarge
from fleetward.store.batching import Batcher
from fleetward.wire.evidence import EnrollmentRequest, EnrollmentResponse, NonceRequest, NonceResponse

router = APIRouter(prefix="/v1/attestation", tags=["attestation"])
JSON = "application/json"
NONCE_PATH = "/v1/attestation/nonce"
CERTIFICATE_PATH = "/v1/attestation/certificate"

EnrollmentBatcher = Batcher[EnrollmentWork, EnrollmentResponse]
BodyReader = Callable[[], Awaitable[bytes]]


async def answer_nonce(authority: AuthorityService, read_body: BodyReader) -> bytes:
    """A nonce for the device the JSON body names."""
    body = await read_body()
    try:
        device_id = NonceRequest.model_validate_json(body).device_id
    except ValidationError:
        raise InvalidInput(
            'send {"device_id": "<64 lower-case hex characters>"}', code="nonce_request_malformed"
        ) from None
    issued = authority.issue_nonce(device_id)
    return NonceResponse(nonce=issued.text, expires_at=issued.expires_at).model_dump_json().encode()


async def answer_certificate(
    authority: AuthorityService, batcher: EnrollmentBatcher, read_body: BodyReader
) -> bytes:
    """A certificate for the enrollment request in the JSON body, or the error that refuses it."""
    try:
        parsed = authority.parse_enrollment(await read_body())
    except FleetwardError as refused:
        await _record(batcher, Refusal(refused, None))
        raise
    issued = await batcher.submit(parsed)
    return issued.model_dump_json().encode()


async def _record(batcher: EnrollmentBatcher, refusal: Refusal) -> None:
    try:
        await batcher.submit(refusal)
    except FleetwardError as error:
        if error is not refusal.error:
            raise


def _reader(request: Request) -> BodyReader:
    async def read() -> bytes:
        try:
            return await request.body()
        except BodyTooLarge as error:
            raise PayloadTooLarge(str(error.detail)) from None

    return read


def _schema_of(model: type[NonceRequest] | type[EnrollmentRequest]) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {JSON: {"schema": model.model_json_schema()}}}}


@router.post("/nonce", response_model=NonceResponse, openapi_extra=_schema_of(NonceRequest))
async def nonce(request: Request) -> Response:
    """A single-use challenge for one device, valid for a short while (2 minutes by default)."""
    answer = await answer_nonce(request.app.state.services.authority, _reader(request))
    return Response(answer, media_type=JSON)


@router.post("/certificate", response_model=EnrollmentResponse, openapi_extra=_schema_of(EnrollmentRequest))
async def certificate(request: Request) -> Response:
    """Present evidence over the nonce, the CSR's key and the measurement log; earn a certificate.

    Renewal is the same call: a device re-attests with its identity key before its certificate expires.
    """
    state = request.app.state
    answer = await answer_certificate(state.services.authority, state.enrollments, _reader(request))
    return Response(answer, media_type=JSON)
