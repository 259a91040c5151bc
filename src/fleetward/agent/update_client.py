"""What a device does to learn what to install and to fetch it safely (ADR 0015, "On the device").

:meth:`UpdateClient.check` refreshes the tenant's image repository with ``tuf.ngclient`` (through an
:class:`HttpxFetcher` that carries the device token), verifies the director's assignment against the
director keys of the root it now trusts, and keeps of the assignment only images that both repositories
agree on, that belong to the device's product and that are not below their component's security floor.
:meth:`UpdateClient.download` fetches one planned image, resumably and never past its signed length, from a
bsdiff delta against the active slot when the repository lists one, and checks its length and hashes
before anyone installs it.

Every verification failure raises :class:`UpdateRefused` with a code (``metadata_expired``,
``metadata_rollback``, ``assignment_other_device``, ``image_hash_mismatch``, …); a network or server
failure raises :class:`TransportError`. Nothing from httpx or python-tuf escapes this module.

The client is synchronous, as ngclient is: the agent calls it through ``asyncio.to_thread``. ngclient
checks metadata expiry against the system clock; the injected clock is the one assignments are checked
with.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import bsdiff4
import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from fleetward.agent.config import write_private_file
from fleetward.clock import Clock, SystemClock
from fleetward.errors import (
    ConfigurationError,
    FleetwardError,
    PermissionDenied,
    ServerError,
    TransportError,
    Unauthenticated,
    UpdateRefused,
)
from fleetward.transport import error_from_response, trust
from fleetward.wire.reports import COMPONENT_ID_PATTERN, ComponentId, VersionText
from fleetward.wire.updates import (
    FLOORS_FIELD,
    MAX_ASSIGNMENT_BYTES,
    MAX_COMPONENTS,
    ImageKind,
    MaintenanceWindow,
    TargetCustom,
    VersionReport,
    check_agreement,
    custom_of,
    delta_path,
    product_of,
    product_role,
    target_path,
    verify_assignment,
)
from fleetward.wire.versions import parse_version

logger = logging.getLogger(__name__)

#: The file in the metadata directory where the client keeps what must never go backwards.
STATE_FILE = "fleetward-update-state.json"
#: How much of an error answer's body is read to learn the server's error code.
_MAX_ERROR_BODY_BYTES = 16 * 1024
_COMPONENT = re.compile(COMPONENT_ID_PATTERN)
#: The codes of a download cut by the network: the partial file stays, the next call resumes.
_INTERRUPTED = frozenset({"download_interrupted", "download_incomplete"})


class TokenSource(Protocol):
    """Makes the ``Authorization`` header of one request (``wire.updates.device_token``): fresh each call."""

    def __call__(self) -> str: ...


@dataclass(frozen=True)
class UpdateClientSettings:
    """What the update client needs; limits have their unit in their name."""

    base_url: str
    metadata_dir: Path
    device_id: str
    product_id: str
    max_image_bytes: int = 256 * 1024 * 1024
    timeout_seconds: float = 30.0
    chunk_bytes: int = 64 * 1024
    #: the CA that signed the server's certificate (``None``: the system's CAs); used only when the client
    #: builds its own ``httpx.Client``
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metadata_dir, Path):
            raise TypeError("metadata_dir is a Path")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        if not self.device_id or not self.product_id:
            raise ValueError("device_id and product_id must not be empty")
        if self.max_image_bytes <= 0 or self.chunk_bytes <= 0 or self.timeout_seconds <= 0:
            raise ValueError("max_image_bytes, chunk_bytes and timeout_seconds must be positive")

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/updates/v1/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/updates/v1/targets/"

    @property
    def assignment_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/updates/v1/assignment"

    @property
    def report_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/updates/v1/report"


@dataclass(frozen=True)
class PlannedImage:
    """One image the device must fetch and install: the image repository's target, verified."""

    component_id: str
    version: str
    kind: ImageKind
    target: TargetFile
    custom: TargetCustom
    #: a bsdiff delta from the installed image, when the repository lists one
    delta: TargetFile | None = None

    @property
    def sha256(self) -> str:
        return self.target.hashes["sha256"]


@dataclass(frozen=True)
class Plan:
    """What the verified assignment asks of this device now (nothing when ``deployment_id`` is ``None``)."""

    assignment_version: int
    deployment_id: str | None
    window: MaintenanceWindow | None
    images: tuple[PlannedImage, ...]
    #: the security floor of each component, the highest ever seen
    floors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Downloaded:
    """A downloaded image whose length and hashes match the image repository's target."""

    path: Path
    bytes_downloaded: int
    bytes_saved: int
    via_delta: bool
    #: why a listed delta was not used (a refusal code), when the full image was fetched instead
    delta_failure: str | None = None


class _State(BaseModel):
    """What must never go backwards on this device, kept beside ngclient's metadata."""

    model_config = ConfigDict(extra="ignore")

    assignment_version: int = Field(default=0, ge=0)
    floors: dict[ComponentId, VersionText] = {}


# --------------------------------------------------------------------------- the fetcher


class HttpxFetcher(FetcherInterface):
    """ngclient's downloads over a synchronous ``httpx.Client``, each request with the device token."""

    def __init__(
        self,
        http: httpx.Client,
        token: TokenSource,
        *,
        timeout_seconds: float = 30.0,
        chunk_bytes: int = 65536,
    ) -> None:
        self._http = http
        self._token = token
        self._timeout = httpx.Timeout(timeout_seconds)
        self._chunk_bytes = chunk_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        request = self._http.build_request(
            "GET", url, headers={"Authorization": self._token()}, timeout=self._timeout
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as error:
            raise tuf_errors.SlowRetrievalError(f"{url} did not answer in time") from error
        except httpx.HTTPError as error:
            raise tuf_errors.DownloadError(f"could not reach {url}: {type(error).__name__}") from error
        if response.status_code != 200:
            translated = _error_answer(response)
            raise _HttpRefusal(translated, response.status_code)
        return self._chunks(response)

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(self._chunk_bytes)
        except httpx.TimeoutException as error:
            raise tuf_errors.SlowRetrievalError(f"{response.url} stalled") from error
        except httpx.HTTPError as error:
            raise tuf_errors.DownloadError(f"{response.url} was cut: {type(error).__name__}") from error
        finally:
            response.close()


class _HttpRefusal(tuf_errors.DownloadHTTPError):
    """tuf's HTTP error, carrying what the server said in fleetward's terms."""

    def __init__(self, error: FleetwardError, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}: {error.message}", status_code)
        self.error = error


def _error_answer(response: httpx.Response) -> FleetwardError:
    """The error an unsuccessful streamed answer stands for; reads at most a bounded part of its body."""
    body = b""
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= _MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    finally:
        response.close()
    return error_from_response(httpx.Response(response.status_code, content=body[:_MAX_ERROR_BODY_BYTES]))


def _metadata_error(error: Exception) -> FleetwardError:
    """A python-tuf error in fleetward's terms: a refusal (unsafe metadata) or a transport failure."""
    detail = str(error) or type(error).__name__
    if isinstance(error, tuf_errors.ExpiredMetadataError):
        return UpdateRefused(f"the repository's metadata expired: {detail}", code="metadata_expired")
    if isinstance(error, tuf_errors.BadVersionNumberError):
        if _is_version_mismatch(detail):
            return UpdateRefused(
                f"the repository served a version its signed parent does not name: {detail}",
                code="metadata_version_mismatch",
            )
        return UpdateRefused(f"the repository's metadata went backwards: {detail}", code="metadata_rollback")
    if isinstance(error, tuf_errors.UnsignedMetadataError):
        return UpdateRefused(
            f"the repository's metadata is not signed by its keys: {detail}",
            code="metadata_signature_invalid",
        )
    if isinstance(error, tuf_errors.LengthOrHashMismatchError):
        return UpdateRefused(
            f"the repository's metadata does not match its signed hashes: {detail}",
            code="metadata_hash_mismatch",
        )
    if isinstance(error, tuf_errors.RepositoryError):
        return UpdateRefused(f"the repository's metadata is invalid: {detail}", code="metadata_invalid")
    if isinstance(error, tuf_errors.DownloadLengthMismatchError):
        return UpdateRefused(f"the repository's metadata is too long: {detail}", code="metadata_too_long")
    if isinstance(error, _HttpRefusal):
        return error.error
    if isinstance(error, tuf_errors.DownloadHTTPError):
        return _status_error(error.status_code, detail)
    if isinstance(error, tuf_errors.SlowRetrievalError):
        return TransportError(f"the repository did not answer in time: {detail}", code="timeout")
    return TransportError(f"could not fetch the repository's metadata: {detail}", code="unreachable")


# python-tuf 7 raises BadVersionNumberError both when a version goes backwards and when the file served is
# not the version its parent names (a mix-and-match); only its message tells them apart.
_VERSION_MISMATCH = (
    re.compile(r"^Expected \S+ v\d+, got v\d+"),  # a targets role, against the snapshot
    re.compile(r"^Expected snapshot version \d+, got \d+"),  # the snapshot, against the timestamp
    re.compile(r"^Expected root version \d+ instead got"),  # N.root.json that is not version N
)


def _is_version_mismatch(detail: str) -> bool:
    return any(pattern.match(detail) for pattern in _VERSION_MISMATCH)


def _status_error(status: int, detail: str) -> FleetwardError:
    if status == 401:
        return Unauthenticated(detail, code="device_token_refused")
    if status == 403:
        return PermissionDenied(detail, code="device_refused")
    if status >= 500:
        return ServerError(detail, code="server_error")
    return TransportError(detail, code="metadata_unavailable")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as error:
        raise _metadata_error(error) from None


# --------------------------------------------------------------------------- the client


class UpdateClient:
    """The device's side of updates for one tenant's image repository and director."""

    def __init__(
        self,
        settings: UpdateClientSettings,
        bootstrap_root: bytes,
        token: TokenSource,
        *,
        http: httpx.Client | None = None,
        clock: Clock | None = None,
    ) -> None:
        _check_bootstrap(bootstrap_root)
        self._settings = settings
        self._bootstrap = bootstrap_root
        self._token = token
        self._clock = clock or SystemClock()
        self._owns_http = http is None
        self._http = http or httpx.Client(
            timeout=settings.timeout_seconds, verify=trust(settings.ca_file), follow_redirects=False
        )
        self._fetcher = HttpxFetcher(
            self._http, token, timeout_seconds=settings.timeout_seconds, chunk_bytes=settings.chunk_bytes
        )
        settings.metadata_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> UpdateClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # ----------------------------------------------------------------- check

    def check(
        self, installed: Mapping[str, tuple[str, str]], floors_seen: Mapping[str, str] | None = None
    ) -> Plan:
        """Refresh the image repository, verify the assignment and plan the images to install.

        ``installed`` maps each component id to the (version, sha256) the device runs; ``floors_seen`` are
        floors the caller knows of (they only ever raise the floors this client keeps).
        """
        updater = self._updater()
        with _translated():
            updater.refresh()
        root = self._trusted_root()
        state = self._load_state()
        floors = _raised(state.floors, floors_seen or {})
        data = self._get_assignment()
        if data is None:
            self._save_state(_State(assignment_version=state.assignment_version, floors=floors))
            return Plan(state.assignment_version, None, None, (), floors)
        assignment = verify_assignment(
            data,
            root,
            device_id=self._settings.device_id,
            now=self._clock.now(),
            newer_than=state.assignment_version,
        )
        self._save_state(_State(assignment_version=assignment.version, floors=floors))
        if len(assignment.targets) > MAX_COMPONENTS:
            raise UpdateRefused("the assignment names too many images", code="assignment_malformed")
        images: list[PlannedImage] = []
        components: set[str] = set()
        role_floors_read = False
        for path, assigned in sorted(assignment.targets.items()):
            if product_of(path) != self._settings.product_id:
                raise UpdateRefused(
                    f"the assignment names {path}, an image of another product", code="image_other_product"
                )
            with _translated():
                listed = updater.get_targetinfo(path)
            check_agreement(assigned, listed)
            assert listed is not None  # check_agreement refused None
            custom = self._checked_custom(path, listed)
            if not role_floors_read:  # the product role is loaded now: its floors are verified
                floors = _raised(floors, self._role_floors())
                self._save_state(_State(assignment_version=assignment.version, floors=floors))
                role_floors_read = True
            floor = floors.get(custom.component_id)
            if floor is not None and parse_version(custom.version) < parse_version(floor):
                raise UpdateRefused(
                    f"{path} is version {custom.version}, below the floor {floor} of its component",
                    code="version_below_floor",
                )
            if custom.component_id in components:
                raise UpdateRefused(
                    f"the assignment names component {custom.component_id} twice", code="assignment_malformed"
                )
            components.add(custom.component_id)
            current = installed.get(custom.component_id)
            if current is not None and current[1] == listed.hashes["sha256"]:
                continue
            delta = self._listed_delta(updater, custom, path, current[1]) if current is not None else None
            images.append(
                PlannedImage(custom.component_id, custom.version, custom.kind, listed, custom, delta)
            )
        return Plan(assignment.version, assignment.deployment_id, assignment.window, tuple(images), floors)

    def _updater(self) -> Updater:
        """A fresh ngclient updater (one refresh each); it finds the newest trusted root in metadata_dir."""
        try:
            return Updater(
                metadata_dir=str(self._settings.metadata_dir),
                metadata_base_url=self._settings.metadata_url,
                fetcher=self._fetcher,
                config=UpdaterConfig(prefix_targets_with_hash=True),
                bootstrap=self._bootstrap,
            )
        except tuf_errors.RepositoryError as error:
            raise ConfigurationError(f"the provisioned root is not valid: {error}") from None

    def _trusted_root(self) -> Root:
        """The root ngclient trusts after its refresh (it links ``root.json`` to the newest it verified)."""
        data = (self._settings.metadata_dir / "root.json").read_bytes()
        return Metadata[Root].from_bytes(data).signed

    def _checked_custom(self, path: str, listed: TargetFile) -> TargetCustom:
        custom = custom_of(listed)
        expected = target_path(custom.product_id, custom.component_id, custom.version)
        if custom.product_id != self._settings.product_id or expected != path or custom.delta_of is not None:
            raise UpdateRefused(
                f"the target {path} describes another image ({expected})", code="target_malformed"
            )
        if "sha256" not in listed.hashes:
            raise UpdateRefused(f"the target {path} has no SHA-256", code="target_malformed")
        if listed.length > self._settings.max_image_bytes:
            raise UpdateRefused(
                f"{path} is {listed.length} bytes, more than {self._settings.max_image_bytes}",
                code="image_too_large",
            )
        return custom

    def _role_floors(self) -> dict[str, str]:
        """The floors of the product role ngclient verified during this check (read back from its cache)."""
        name = product_role(self._settings.product_id)
        try:
            data = (self._settings.metadata_dir / f"{name}.json").read_bytes()
        except FileNotFoundError:
            return {}
        value = Metadata[Targets].from_bytes(data).signed.unrecognized_fields.get(FLOORS_FIELD, {})
        if not isinstance(value, Mapping):
            raise UpdateRefused(f"the floors of {name} are not an object", code="metadata_invalid")
        floors: dict[str, str] = {}
        for component, version in value.items():
            if not isinstance(component, str) or not _COMPONENT.fullmatch(component):
                continue  # a floor of another measurement (the agent's, by name): not an image's
            try:
                parse_version(version)
            except (TypeError, ValueError):
                raise UpdateRefused(
                    f"{name} has a malformed floor {version!r}", code="metadata_invalid"
                ) from None
            floors[component] = version
        return floors

    def _listed_delta(
        self, updater: Updater, custom: TargetCustom, path: str, base: str
    ) -> TargetFile | None:
        """The delta from the installed image, when the repository lists a usable one."""
        at = delta_path(custom.product_id, custom.component_id, custom.version, base)
        with _translated():
            delta = updater.get_targetinfo(at)
        if delta is None:
            return None
        try:
            delta_custom = custom_of(delta)
        except UpdateRefused as refusal:
            logger.warning("ignoring the delta %s: %s", at, refusal)
            return None
        usable = (
            delta_custom.delta_base_sha256 == base
            and delta_custom.delta_of == path
            and "sha256" in delta.hashes
            and delta.length <= self._settings.max_image_bytes
        )
        if not usable:
            logger.warning(
                "ignoring the delta %s: it does not describe a delta from %s to %s", at, base, path
            )
            return None
        return delta

    def _get_assignment(self) -> bytes | None:
        """The signed assignment's bytes (at most one byte more than allowed), or ``None`` (204)."""
        url = self._settings.assignment_url
        try:
            with self._http.stream("GET", url, headers={"Authorization": self._token()}) as response:
                if response.status_code == 204:
                    return None
                if response.status_code != 200:
                    raise _error_answer(response)
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ASSIGNMENT_BYTES:
                        break
                return bytes(body)
        except httpx.HTTPError as error:
            raise TransportError(
                f"could not fetch {url}: {type(error).__name__}", code="unreachable"
            ) from None

    # ----------------------------------------------------------------- state

    def _load_state(self) -> _State:
        path = self._settings.metadata_dir / STATE_FILE
        try:
            return _State.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return _State()
        except ValidationError:
            raise UpdateRefused(f"the update state {path} is damaged", code="update_state_corrupt") from None

    def _save_state(self, state: _State) -> None:
        write_private_file(self._settings.metadata_dir / STATE_FILE, state.model_dump_json().encode())

    # ----------------------------------------------------------------- download

    def download(self, image: PlannedImage, partial: Path, have: Path | None = None) -> Downloaded:
        """Fetch ``image`` into ``partial`` and verify it; the verified image is left at ``partial``.

        A ``partial`` left by an earlier call is continued with a range request; a complete one is only
        verified. With a listed delta and ``have`` (the active slot's package, the delta's base), the delta
        is fetched and applied instead; if anything about it fails, the full image is fetched. A partial full
        download in progress is always continued rather than replaced by a delta.
        """
        delta_failure: str | None = None
        tally = _Tally()
        if image.delta is not None and have is not None and _size(partial) == 0:
            try:
                return self._download_delta(image, image.delta, partial, have, tally)
            except _DeltaFailed as failure:
                delta_failure = failure.code
                logger.warning(
                    "the delta for %s failed (%s): fetching the full image", image.target.path, failure
                )
        self._fetch_verified(image.target, partial, tally)
        return Downloaded(partial, tally.received, 0, False, delta_failure)

    def _download_delta(
        self, image: PlannedImage, delta: TargetFile, partial: Path, have: Path, tally: _Tally
    ) -> Downloaded:
        delta_file = partial.with_name(partial.name + ".delta")
        try:
            base = _read_bounded(have, self._settings.max_image_bytes)
            if hashlib.sha256(base).hexdigest() != custom_of(delta).delta_base_sha256:
                raise UpdateRefused("the active image is not the delta's base", code="delta_base_mismatch")
            self._fetch_verified(delta, delta_file, tally)
            patch = delta_file.read_bytes()
            if _patched_length(patch) != image.target.length:
                raise UpdateRefused("the delta produces an image of another length", code="delta_corrupt")
            try:
                result = bsdiff4.patch(base, patch)
            except (ValueError, OSError, RuntimeError, EOFError) as error:
                raise UpdateRefused(f"the delta does not apply: {error}", code="delta_corrupt") from None
            try:
                image.target.verify_length_and_hashes(result)
            except tuf_errors.LengthOrHashMismatchError:
                raise UpdateRefused(
                    "the patched image does not match the image repository", code="delta_result_mismatch"
                ) from None
            write_private_file(partial, result)  # only verified bytes reach the partial file
        except UpdateRefused as refusal:
            delta_file.unlink(missing_ok=True)
            raise _DeltaFailed(refusal.message, refusal.code) from None
        except TransportError as error:
            if error.code in _INTERRUPTED:
                raise  # resumable: the delta's partial stays for the next call
            delta_file.unlink(missing_ok=True)
            raise _DeltaFailed(error.message, error.code) from None
        except FleetwardError as error:  # the server refused the delta (404, 403…): the full image may work
            delta_file.unlink(missing_ok=True)
            raise _DeltaFailed(error.message, error.code) from None
        delta_file.unlink(missing_ok=True)
        saved = max(0, image.target.length - delta.length)
        return Downloaded(partial, tally.received, saved, True)

    def _fetch_verified(self, target: TargetFile, destination: Path, tally: _Tally) -> None:
        """Fetch ``target`` into ``destination`` (continuing what is there) and verify it."""
        offset = _size(destination)
        if offset > target.length:
            destination.unlink()
            offset = 0
        if offset < target.length:
            self._fetch(target, destination, offset, tally)
        try:
            with destination.open("rb") as file:
                target.verify_length_and_hashes(file)
        except tuf_errors.LengthOrHashMismatchError:
            destination.unlink(missing_ok=True)
            raise UpdateRefused(
                f"the bytes of {target.path} do not match the image repository", code="image_hash_mismatch"
            ) from None

    def _fetch(self, target: TargetFile, destination: Path, offset: int, tally: _Tally) -> None:
        url = self._target_url(target)
        # identity: a range counts the bytes of the file itself, and nothing is decompressed on the way
        headers = {"Authorization": self._token(), "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        too_long = False
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code == 200:
                    offset = 0  # the server ignored the range: start again
                elif response.status_code in (206, 416):
                    if not offset or _range_start(response) != offset:
                        destination.unlink(missing_ok=True)  # the next call starts again from zero
                        raise TransportError(
                            f"the server answered a range of {target.path} other than the one asked",
                            code="range_mismatch",
                        )
                else:
                    raise _error_answer(response)
                size = offset
                with destination.open("ab" if offset else "wb") as file:
                    for chunk in response.iter_bytes():  # as they arrive: a cut loses nothing received
                        if size + len(chunk) > target.length:
                            too_long = True
                            break
                        file.write(chunk)
                        size += len(chunk)
                        tally.received += len(chunk)
                    file.flush()
                    os.fsync(file.fileno())
        except httpx.HTTPError as error:
            raise TransportError(
                f"the download of {target.path} was cut: {type(error).__name__}",
                code="download_interrupted",
            ) from None
        if too_long:
            destination.unlink(missing_ok=True)
            raise UpdateRefused(
                f"the server sent more of {target.path} than its {target.length} signed bytes",
                code="image_too_long",
            )
        if size < target.length:
            raise TransportError(
                f"the server ended {target.path} after {size} of {target.length} bytes",
                code="download_incomplete",
            )

    def _target_url(self, target: TargetFile) -> str:
        """Consistent snapshots: the file's name is prefixed with its SHA-256."""
        directory, slash, name = target.path.rpartition("/")
        return f"{self._settings.targets_url}{directory}{slash}{target.hashes['sha256']}.{name}"

    # ----------------------------------------------------------------- report

    def report(self, report: VersionReport) -> None:
        """Tell the director what the device runs and how its updates went."""
        url = self._settings.report_url
        try:
            response = self._http.post(
                url,
                content=report.model_dump_json().encode(),
                headers={"Authorization": self._token(), "Content-Type": "application/json"},
            )
        except httpx.HTTPError as error:
            raise TransportError(
                f"could not reach {url}: {type(error).__name__}", code="unreachable"
            ) from None
        if not response.is_success:
            raise error_from_response(response)


class _DeltaFailed(Exception):
    """The delta could not be used; the full image is fetched instead."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Tally:
    """The bytes one download call received, whatever became of them."""

    received: int = 0


# --------------------------------------------------------------------------- helpers


def _check_bootstrap(data: bytes) -> None:
    """The provisioned root must be a root signed by its own threshold."""
    try:
        metadata = Metadata[Root].from_bytes(data)
        if not isinstance(metadata.signed, Root):
            raise TypeError("not root metadata")
        metadata.signed.verify_delegate(Root.type, metadata.signed_bytes, metadata.signatures)
    except (tuf_errors.RepositoryError, ValueError, TypeError, KeyError) as error:
        raise ConfigurationError(f"the provisioned root is not valid: {error}") from None


def _raised(floors: Mapping[str, str], more: Mapping[str, str]) -> dict[str, str]:
    """``floors`` with each component's floor raised to the one in ``more`` where that is higher."""
    result = dict(floors)
    for component, version in more.items():
        current = result.get(component)
        if current is None or parse_version(version) > parse_version(current):
            result[component] = version
    return result


def _range_start(response: httpx.Response) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _patched_length(patch: bytes) -> int:
    """The length a bsdiff4 patch says it produces (checked before patching: no decompression bomb)."""
    if len(patch) < 32 or patch[:8] != b"BSDIFF40":
        raise UpdateRefused("the delta is not a bsdiff4 patch", code="delta_corrupt")
    raw = bytearray(patch[24:32])
    negative = raw[7] & 0x80
    raw[7] &= 0x7F
    value = int.from_bytes(raw, "little")
    return -value if negative else value


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_bounded(path: Path, limit: int) -> bytes:
    if _size(path) > limit:
        raise UpdateRefused(f"{path} is larger than {limit} bytes", code="delta_base_mismatch")
    return path.read_bytes()


__all__ = [
    "STATE_FILE",
    "Downloaded",
    "HttpxFetcher",
    "Plan",
    "PlannedImage",
    "TokenSource",
    "UpdateClient",
    "UpdateClientSettings",
]
