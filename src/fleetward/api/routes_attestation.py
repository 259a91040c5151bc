"""Device routes: ask for a nonce, present evidence with a CSR, get a 24-hour certificate.

These two routes are the hot path. They read and answer raw JSON (the schemas still appear in the
OpenAPI document) and run on the event loop; the store's work is group-committed by the enrollment
batcher. Every refusal, malformed input included, is recorded as an event with the next batch.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from fleetward.api.limits import BodyTooLarge
from fleetward.authority.service import EnrollmentWork, Refusal
from fleetward.errors import FleetwardError, InvalidInput, PayloadTooLarge
from fleetward.store.batching import Batcher
from fleetward.wire.evidence import EnrollmentRequest, EnrollmentResponse, NonceRequest, NonceResponse

router = APIRouter(prefix="/v1/attestation", tags=["attestation"])
JSON = "application/json"


def _schema_of(model: type[NonceRequest] | type[EnrollmentRequest]) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {JSON: {"schema": model.model_json_schema()}}}}


@router.post("/nonce", response_model=NonceResponse, openapi_extra=_schema_of(NonceRequest))
async def nonce(request: Request) -> Response:
    """A single-use challenge for one device, valid for a short while (2 minutes by default)."""
    try:
        body = await request.body()
        device_id = NonceRequest.model_validate_json(body).device_id
    except BodyTooLarge as error:
        raise PayloadTooLarge(str(error.detail)) from None
    except ValidationError:
        raise InvalidInput(
            'send {"device_id": "<64 lower-case hex characters>"}', code="nonce_request_malformed"
        ) from None
    issued = request.app.state.services.authority.issue_nonce(device_id)
    answer = NonceResponse(nonce=issued.text, expires_at=issued.expires_at)
    return Response(answer.model_dump_json(), media_type=JSON)


@router.post("/certificate", response_model=EnrollmentResponse, openapi_extra=_schema_of(EnrollmentRequest))
async def certificate(request: Request) -> Response:
    """Present evidence over the nonce, the CSR's key and the measurement log; earn a certificate.

    Renewal is the same call: a device re-attests with its identity key before its certificate expires.
    """
    authority = request.app.state.services.authority
    batcher: Batcher[EnrollmentWork, EnrollmentResponse] = request.app.state.enrollments
    try:
        try:
            body = await request.body()
        except BodyTooLarge as error:
            raise PayloadTooLarge(str(error.detail)) from None
        parsed = authority.parse_enrollment(body)
    except FleetwardError as refused:
        await _record(batcher, Refusal(refused, None))
        raise
    issued = await batcher.submit(parsed)
    return Response(issued.model_dump_json(), media_type=JSON)


async def _record(batcher: Batcher[EnrollmentWork, EnrollmentResponse], refusal: Refusal) -> None:
    try:
        await batcher.submit(refusal)
    except FleetwardError as error:
        if error is not refusal.error:
            raise
