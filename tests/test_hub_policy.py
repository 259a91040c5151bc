"""The pure policy cores of the hub: which topics a device may use (topics.py), how twins merge and what
bounds them (twin.py), and who a certificate and a CONNECT say the device is, its outbound window and its
rate limit (session.py). No sockets, no store, no clock but the one passed in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import replace
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from fleetward.authority import ca
from fleetward.errors import AccessRefused, InvalidInput, PayloadTooLarge, ProtocolViolation
from fleetward.hub import topics, twin
from fleetward.hub.codec import Connect, ConnectReturnCode, Will
from fleetward.hub.feed import TelemetryFeed, decode_batch, encode, encode_batch
from fleetward.hub.session import (
    Backlog,
    ConnectRefused,
    OutboundWindow,
    PeerIdentity,
    TokenBucket,
    check_connect,
    identify,
)
from fleetward.hub.store import TelemetryMessage
from fleetward.hub.topics import (
    AccessMode,
    MethodResponse,
    Subscription,
    Telemetry,
    TwinGet,
    TwinReported,
    classify_publish,
    classify_subscribe,
)
from fleetward.store.trust import TrustBell
from fleetward.wire.identity import device_id_for

DEVICE = "a" * 64
OTHER = "b" * 64
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


# ============================================================================================== topics.py

ALLOWED_PUBLISH: list[tuple[str, topics.DevicePublish]] = [
    (f"devices/{DEVICE}/messages/events", Telemetry(())),
    (f"devices/{DEVICE}/messages/events/", Telemetry(())),
    (
        f"devices/{DEVICE}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&room=lab%201",
        Telemetry((("$.ct", "application/json"), ("$.ce", "utf-8"), ("room", "lab 1"))),
    ),
    (f"devices/{DEVICE}/messages/events/empty=", Telemetry((("empty", ""),))),
    ("$iothub/twin/GET/?$rid=1", TwinGet("1")),
    ("$iothub/twin/GET/?$rid=a.b_c:d-e", TwinGet("a.b_c:d-e")),
    ("$iothub/twin/PATCH/properties/reported/?$rid=42", TwinReported("42")),
    ("$iothub/twin/PATCH/properties/reported/?$rid=42&$version=7", TwinReported("42")),
    ("$iothub/methods/res/200/?$rid=9", MethodResponse("9", 200)),
    ("$iothub/methods/res/404/?$rid=x", MethodResponse("x", 404)),
]


@pytest.mark.parametrize(("topic", "decided"), ALLOWED_PUBLISH)
def test_a_device_may_publish_to_its_own_topics_of_the_iot_hub_dialect(
    topic: str, decided: topics.DevicePublish
) -> None:
    assert classify_publish(DEVICE, topic) == decided


REFUSED_PUBLISH: list[tuple[str, str, str]] = [
    ("another device's telemetry", f"devices/{OTHER}/messages/events/", "topic_refused"),
    ("another device's telemetry, no bag", f"devices/{OTHER}/messages/events", "topic_refused"),
    ("a random topic", "sensors/temperature", "topic_refused"),
    ("the empty topic", "", "topic_refused"),
    ("the broker's system topics", "$SYS/broker/clients", "topic_refused"),
    ("a prefix of telemetry", f"devices/{DEVICE}/messages/eventsX", "topic_refused"),
    ("its own device id, upper case", f"devices/{DEVICE.upper()}/messages/events/", "topic_refused"),
    ("its own cloud-to-device topic", f"devices/{DEVICE}/messages/devicebound/x", "topic_refused"),
    ("a module's telemetry", f"devices/{DEVICE}/modules/edge/messages/events/", "topic_refused"),
    ("a module's twin", "$iothub/twin/GET/modules/edge/?$rid=1", "topic_refused"),
    ("the desired half of its twin", "$iothub/twin/PATCH/properties/desired/?$rid=1", "topic_refused"),
    ("a direct method request", "$iothub/methods/POST/reboot/?$rid=1", "topic_refused"),
    ("a twin request without $rid", "$iothub/twin/GET/", "topic_refused"),
    ("a twin request without '?'", "$iothub/twin/GET/$rid=1", "topic_refused"),
    ("a twin request with an empty $rid", "$iothub/twin/GET/?$rid=", "topic_refused"),
    ("a twin request whose $rid has a space", "$iothub/twin/GET/?$rid=a%20b", "topic_refused"),
    ("a twin request with a 129-character $rid", "$iothub/twin/GET/?$rid=" + "r" * 129, "topic_refused"),
    ("a twin request with malformed parameters", "$iothub/twin/GET/?$rid", "topic_refused"),
    ("a twin request with nine parameters", "$iothub/twin/GET/?$rid=1" + "&a=1" * 8, "topic_refused"),
    ("a method answer without a status", "$iothub/methods/res/?$rid=1", "topic_refused"),
    ("a method answer with a word for status", "$iothub/methods/res/ok/?$rid=1", "topic_refused"),
    ("a method answer with a four-digit status", "$iothub/methods/res/2000/?$rid=1", "topic_refused"),
    ("a method answer without its request", "$iothub/methods/res/200", "topic_refused"),
    ("a method answer with a negative status", "$iothub/methods/res/-1/?$rid=1", "topic_refused"),
    # the property bag of telemetry
    ("a property without '='", f"devices/{DEVICE}/messages/events/alert", "bad_properties"),
    ("an empty pair in the bag", f"devices/{DEVICE}/messages/events/a=1&&b=2", "bad_properties"),
    ("a property with an empty key", f"devices/{DEVICE}/messages/events/=1", "bad_properties"),
    ("a 129-character key", f"devices/{DEVICE}/messages/events/{'k' * 129}=1", "bad_properties"),
    ("a 1025-character value", f"devices/{DEVICE}/messages/events/k={'v' * 1025}", "bad_properties"),
    (
        "65 properties",
        f"devices/{DEVICE}/messages/events/" + "&".join(f"k{n}=v" for n in range(65)),
        "bad_properties",
    ),
]


@pytest.mark.parametrize(
    ("topic", "code"), [pytest.param(topic, code, id=name) for name, topic, code in REFUSED_PUBLISH]
)
def test_a_publish_outside_the_device_s_topics_is_refused_with_its_code(topic: str, code: str) -> None:
    with pytest.raises(AccessRefused) as refused:
        classify_publish(DEVICE, topic)
    assert refused.value.code == code


def test_the_property_bag_holds_up_to_its_bounds_exactly() -> None:
    bag = "&".join(f"k{n}=v" for n in range(topics.MAX_PROPERTIES))
    assert len(topics.parse_properties(bag)) == topics.MAX_PROPERTIES
    longest = f"{'k' * topics.MAX_PROPERTY_KEY_CHARS}={'v' * topics.MAX_PROPERTY_VALUE_CHARS}"
    assert topics.parse_properties(longest) == (
        ("k" * topics.MAX_PROPERTY_KEY_CHARS, "v" * topics.MAX_PROPERTY_VALUE_CHARS),
    )


def test_the_property_bag_bounds_count_decoded_characters_not_escapes() -> None:
    """``%41`` is one character: the bound is on what the device means, not on how it spelled it."""
    assert topics.parse_properties("k=" + "%41" * topics.MAX_PROPERTY_VALUE_CHARS) == (
        ("k", "A" * topics.MAX_PROPERTY_VALUE_CHARS),
    )


ALLOWED_SUBSCRIBE: list[tuple[str, Subscription]] = [
    (f"devices/{DEVICE}/messages/devicebound/#", Subscription.CLOUD_TO_DEVICE),
    ("$iothub/methods/POST/#", Subscription.METHODS),
    ("$iothub/twin/res/#", Subscription.TWIN_RESPONSES),
    ("$iothub/twin/PATCH/properties/desired/#", Subscription.TWIN_DESIRED),
]


@pytest.mark.parametrize(("topic_filter", "subscription"), ALLOWED_SUBSCRIBE)
def test_a_device_may_subscribe_to_its_own_filters(topic_filter: str, subscription: Subscription) -> None:
    assert classify_subscribe(DEVICE, topic_filter) is subscription


REFUSED_SUBSCRIBE: list[tuple[str, str]] = [
    ("everything", "#"),
    ("every device's messages", "devices/+/messages/devicebound/#"),
    ("another device's cloud-to-device messages", f"devices/{OTHER}/messages/devicebound/#"),
    ("another device's telemetry", f"devices/{OTHER}/messages/events/#"),
    ("its own telemetry", f"devices/{DEVICE}/messages/events/#"),
    ("all of its own topics", f"devices/{DEVICE}/#"),
    ("a module's messages", f"devices/{DEVICE}/modules/edge/messages/devicebound/#"),
    ("all of $iothub", "$iothub/#"),
    ("twin requests of any device", "$iothub/twin/GET/#"),
    ("reported patches", "$iothub/twin/PATCH/properties/reported/#"),
    ("method answers", "$iothub/methods/res/#"),
    ("one method, not the filter", "$iothub/methods/POST/reboot"),
    ("the broker's system topics", "$SYS/#"),
    ("the filter without its wildcard", "$iothub/twin/res/"),
    ("a single-level wildcard instead", "$iothub/twin/res/+"),
]


@pytest.mark.parametrize("topic_filter", [pytest.param(f, id=name) for name, f in REFUSED_SUBSCRIBE])
def test_a_subscription_outside_the_device_s_filters_is_refused(topic_filter: str) -> None:
    with pytest.raises(AccessRefused) as refused:
        classify_subscribe(DEVICE, topic_filter)
    assert refused.value.code == "topic_refused"


QUARANTINE_PUBLISH: list[tuple[str, bool]] = [
    ("$iothub/twin/GET/?$rid=1", True),
    ("$iothub/twin/PATCH/properties/reported/?$rid=1", True),
    (f"devices/{DEVICE}/messages/events/", False),
    ("$iothub/methods/res/200/?$rid=1", False),
]


@pytest.mark.parametrize(("topic", "allowed"), QUARANTINE_PUBLISH)
def test_a_quarantined_device_may_publish_only_to_its_twin(topic: str, allowed: bool) -> None:
    if allowed:
        assert isinstance(classify_publish(DEVICE, topic, AccessMode.QUARANTINED), TwinGet | TwinReported)
    else:
        with pytest.raises(AccessRefused) as refused:
            classify_publish(DEVICE, topic, AccessMode.QUARANTINED)
        assert refused.value.code == "quarantined"


@pytest.mark.parametrize(("topic_filter", "subscription"), ALLOWED_SUBSCRIBE)
def test_a_quarantined_device_may_subscribe_only_to_its_twin(
    topic_filter: str, subscription: Subscription
) -> None:
    if subscription in (Subscription.TWIN_RESPONSES, Subscription.TWIN_DESIRED):
        assert classify_subscribe(DEVICE, topic_filter, AccessMode.QUARANTINED) is subscription
    else:
        with pytest.raises(AccessRefused) as refused:
            classify_subscribe(DEVICE, topic_filter, AccessMode.QUARANTINED)
        assert refused.value.code == "quarantined"


def test_quarantine_does_not_open_what_full_access_refuses() -> None:
    with pytest.raises(AccessRefused) as refused:
        classify_publish(DEVICE, f"devices/{OTHER}/messages/events/", AccessMode.QUARANTINED)
    assert refused.value.code == "topic_refused"


@pytest.mark.parametrize(
    "properties",
    [
        (("$.mid", "1"),),
        (("", "v"),),
        (("k" * 129, "v"),),
        (("k", "v" * 1025),),
        tuple((f"k{n}", "v") for n in range(65)),
    ],
)
def test_application_properties_from_the_cloud_are_bounded_and_stay_out_of_the_system_space(
    properties: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(InvalidInput) as refused:
        topics.check_application_properties(properties)
    assert refused.value.code == "bad_properties"


bag_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)


@given(st.lists(st.tuples(bag_text, bag_text), max_size=8))
def test_a_cloud_to_device_topic_falls_under_the_device_filter_and_its_properties_read_back(
    properties: list[tuple[str, str]],
) -> None:
    topic = topics.cloud_to_device_topic(DEVICE, "m-1", tuple(properties))
    prefix = f"devices/{DEVICE}/messages/devicebound/"
    assert topic.startswith(prefix)
    assert "+" not in topic
    assert "#" not in topic
    assert topics.parse_properties(topic[len(prefix) :]) == (
        ("$.mid", "m-1"),
        ("$.to", f"/devices/{DEVICE}/messages/deviceBound"),
        *properties,
    )


def test_the_topics_the_hub_answers_on_fall_under_the_filters_a_device_may_hold() -> None:
    assert topics.twin_response_topic(200, "7", 3).startswith("$iothub/twin/res/")
    assert topics.twin_response_topic(204, "7", 3) == "$iothub/twin/res/204/?$rid=7&$version=3"
    assert topics.desired_patch_topic(5).startswith("$iothub/twin/PATCH/properties/desired/")
    assert topics.method_request_topic("reboot", "a1") == "$iothub/methods/POST/reboot/?$rid=a1"


@pytest.mark.parametrize("name", ["", "a/b", "a+b", "#", "x" * 129, "re boot"])
def test_a_method_name_that_would_break_its_topic_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="method name"):
        topics.check_method_name(name)


# ============================================================================================== twin.py

MAX = 32 * 1024

MERGES: list[tuple[str, twin.JsonObject, twin.JsonObject, twin.JsonObject]] = [
    ("a new key is added", {"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
    ("a key is replaced", {"a": 1}, {"a": "x"}, {"a": "x"}),
    ("null removes a key", {"a": 1, "b": 2}, {"a": None}, {"b": 2}),
    ("null for a missing key changes nothing", {"a": 1}, {"z": None}, {"a": 1}),
    (
        "objects merge key by key",
        {"o": {"x": 1, "y": 2}},
        {"o": {"y": 3, "z": 4}},
        {"o": {"x": 1, "y": 3, "z": 4}},
    ),
    ("null removes a nested key", {"o": {"x": 1, "y": 2}}, {"o": {"x": None}}, {"o": {"y": 2}}),
    ("an object replaces a scalar", {"o": 1}, {"o": {"x": 1}}, {"o": {"x": 1}}),
    ("a scalar replaces an object", {"o": {"x": 1}}, {"o": 1}, {"o": 1}),
    ("a list replaces a list whole", {"l": [1, 2, 3]}, {"l": [4]}, {"l": [4]}),
    ("a nested null under a new key leaves an empty object", {}, {"o": {"x": None}}, {"o": {}}),
    ("three levels deep", {"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": None}}}, {"a": {"b": {"d": 2}}}),
    ("the empty patch changes nothing", {"a": {"b": 1}}, {}, {"a": {"b": 1}}),
]


@pytest.mark.parametrize(
    ("properties", "patch", "merged"), [pytest.param(p, q, m, id=name) for name, p, q, m in MERGES]
)
def test_a_patch_merges_as_json_merge_patch(
    properties: twin.JsonObject, patch: twin.JsonObject, merged: twin.JsonObject
) -> None:
    before = json.dumps(properties), json.dumps(patch)
    assert twin.merge(properties, patch) == merged
    assert (json.dumps(properties), json.dumps(patch)) == before  # neither input changes


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_keys = st.text(alphabet="abcdef", min_size=1, max_size=3)
json_objects = st.recursive(
    st.dictionaries(json_keys, json_scalars, max_size=4),
    lambda children: st.dictionaries(json_keys, json_scalars | children, max_size=4),
    max_leaves=20,
)


@given(json_objects, json_objects)
def test_applying_the_same_patch_twice_is_the_same_as_once(
    properties: twin.JsonObject, patch: twin.JsonObject
) -> None:
    once = twin.merge(properties, patch)
    assert twin.merge(once, patch) == once


@given(json_objects, json_objects)
def test_after_a_merge_no_value_is_null_where_the_patch_said_null(
    properties: twin.JsonObject, patch: twin.JsonObject
) -> None:
    merged = twin.merge(properties, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in merged


def test_each_change_grows_the_version_by_one() -> None:
    half = twin.TwinHalf({"a": 1}, 4)
    changed = twin.apply(half, {"b": 2}, MAX)
    assert changed == twin.TwinHalf({"a": 1, "b": 2}, 5)
    assert changed.with_version() == {"a": 1, "b": 2, "$version": 5}
    assert half == twin.TwinHalf({"a": 1}, 4)


def test_a_half_may_hold_exactly_its_bound_and_not_a_byte_more() -> None:
    """The bound is on the compact JSON of the properties: ``{"k":"…"}`` is 8 bytes plus the value."""
    empty = twin.TwinHalf({}, 1)
    assert twin.apply(empty, {"k": "x" * (MAX - 8)}, MAX).version == 2
    with pytest.raises(PayloadTooLarge) as refused:
        twin.apply(empty, {"k": "x" * (MAX - 7)}, MAX)
    assert refused.value.code == "twin_too_large"


def test_small_patches_that_add_up_past_the_bound_are_refused() -> None:
    half = twin.TwinHalf({f"k{n}": "x" * 1000 for n in range(32)}, 9)
    with pytest.raises(PayloadTooLarge) as refused:
        twin.apply(half, {"one-more": "x" * 1000}, MAX)
    assert refused.value.code == "twin_too_large"
    assert twin.apply(half, {"k0": None, "one-more": "x" * 1000}, MAX).version == 10


def test_the_twin_document_carries_both_halves_with_their_versions() -> None:
    document = twin.Twin(twin.TwinHalf({"d": 1}, 2), twin.TwinHalf({"r": 1}, 3)).document()
    assert document == {"desired": {"d": 1, "$version": 2}, "reported": {"r": 1, "$version": 3}}


def nested(levels: int) -> twin.JsonObject:
    """An object ``levels`` deep: ``nested(1) == {"k": 1}``."""
    value: twin.JsonObject = {"k": 1}
    for _ in range(levels - 1):
        value = {"k": value}
    return value


def test_a_patch_may_nest_ten_levels() -> None:
    assert twin.parse_patch(json.dumps(nested(twin.MAX_DEPTH)).encode(), MAX) == nested(twin.MAX_DEPTH)


def test_a_patch_keeps_its_keys_and_drops_the_version_the_hub_keeps() -> None:
    assert twin.parse_patch(b'{"a": 1, "$version": 99, "b": {"c": null}}', MAX) == {"a": 1, "b": {"c": None}}


def test_a_key_of_128_characters_is_accepted() -> None:
    assert twin.parse_patch(json.dumps({"k" * 128: 1}).encode(), MAX) == {"k" * 128: 1}


BAD_PATCHES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{", "twin_patch_malformed"),
    ("not UTF-8", b'{"a": "\xff"}', "twin_patch_malformed"),
    ("empty", b"", "twin_patch_malformed"),
    ("a list", b"[1, 2]", "twin_patch_malformed"),
    ("a string", b'"x"', "twin_patch_malformed"),
    ("null", b"null", "twin_patch_malformed"),
    ("a number", b"1", "twin_patch_malformed"),
    ("NaN, which is not JSON", b'{"a": NaN}', "twin_patch_malformed"),
    ("Infinity, nested", b'{"a": {"b": [-Infinity]}}', "twin_patch_malformed"),
    ("a number of 5000 digits", b'{"a": ' + b"1" * 5000 + b"}", "twin_patch_malformed"),
    ("an empty key", b'{"": 1}', "twin_bad_key"),
    ("a 129-character key", json.dumps({"k" * 129: 1}).encode(), "twin_bad_key"),
    ("a key with a dot", b'{"a.b": 1}', "twin_bad_key"),
    ("a key with a dollar", b'{"$a": 1}', "twin_bad_key"),
    ("a key with a space", b'{"a b": 1}', "twin_bad_key"),
    ("a key with a control character", b'{"a\\u0001": 1}', "twin_bad_key"),
    ("a key with a newline", b'{"a\\n": 1}', "twin_bad_key"),
    ("a bad key nested", b'{"a": {"b": {"c.d": 1}}}', "twin_bad_key"),
    ("eleven levels", json.dumps(nested(twin.MAX_DEPTH + 1)).encode(), "twin_too_deep"),
    ("a bad key inside a list", b'{"a": [{"$b c": 1}]}', "twin_bad_key"),
    (
        "objects nested past the limit inside a list",
        json.dumps({"a": [nested(twin.MAX_DEPTH)]}).encode(),
        "twin_too_deep",
    ),
    ("lists nested thousands deep", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "twin_too_deep"),
]


@pytest.mark.parametrize(
    ("body", "code"), [pytest.param(body, code, id=name) for name, body, code in BAD_PATCHES]
)
def test_a_malformed_patch_is_refused_with_its_code(body: bytes, code: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        twin.parse_patch(body, MAX)
    assert refused.value.code == code


def test_a_patch_over_the_bound_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(PayloadTooLarge) as refused:
        twin.parse_patch(b"{" + b" " * MAX + b"}", MAX)
    assert refused.value.code == "twin_too_large"


# ============================================================================================== session.py


class Tenant:
    """A tenant's root and issuing CA, built with the authority's own profile functions."""

    def __init__(self, tenant_id: str) -> None:
        self.id = tenant_id
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = ca.build_root_ca(root_key, tenant_id, NOW - dt.timedelta(days=30), dt.timedelta(days=3650))
        key = ec.generate_private_key(ec.SECP256R1())
        issuing = ca.build_issuing_ca(
            root_key,
            root,
            key,
            tenant_id,
            NOW - dt.timedelta(days=30),
            dt.timedelta(days=365),
            "https://x/crl",
        )
        self.issuer = ca.Issuer("ca-" + tenant_id, tenant_id, key, issuing, root, "https://x/crl")

    def issue(self, device_id: str, *, now: dt.datetime = NOW, serial: int = 0x1234) -> x509.Certificate:
        return ca.issue_operational_certificate(
            self.issuer,
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            device_id,
            serial,
            now,
            dt.timedelta(hours=24),
            dt.timedelta(minutes=5),
        )

    def custom(
        self,
        common_names: list[str],
        names: list[x509.GeneralName] | None,
        *,
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        """A certificate with whatever names it is given, signed by this issuing CA (or ``signer``)."""
        builder = (
            x509.CertificateBuilder()
            .issuer_name(self.issuer.certificate.subject)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names]))
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(hours=1))
            .not_valid_after(NOW + dt.timedelta(hours=1))
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer or self.issuer.key, hashes.SHA256())


@pytest.fixture(scope="module")
def tenant() -> Tenant:
    return Tenant("tenant-a")


@pytest.fixture(scope="module")
def other_tenant() -> Tenant:
    return Tenant("tenant-b")


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def test_an_operational_certificate_names_its_tenant_device_serial_and_end(tenant: Tenant) -> None:
    certificate = tenant.issue(DEVICE, serial=0xBEEF)
    identity = identify(der(certificate), {tenant.id: tenant.issuer.certificate}, NOW)
    assert identity == PeerIdentity(tenant.id, DEVICE, "beef", certificate.not_valid_after_utc)


def test_a_certificate_is_valid_from_its_first_second_to_just_before_its_last(tenant: Tenant) -> None:
    certificate = tenant.issue(DEVICE)
    anchors = {tenant.id: tenant.issuer.certificate}
    assert identify(der(certificate), anchors, certificate.not_valid_before_utc).device_id == DEVICE
    last = certificate.not_valid_after_utc - dt.timedelta(seconds=1)
    assert identify(der(certificate), anchors, last).device_id == DEVICE


@pytest.mark.parametrize(
    ("case", "now"),
    [
        ("expired", NOW + dt.timedelta(hours=24)),
        ("long expired", NOW + dt.timedelta(days=400)),
        ("not yet valid", NOW - dt.timedelta(minutes=5, seconds=1)),
    ],
)
def test_a_certificate_outside_its_validity_is_refused(tenant: Tenant, case: str, now: dt.datetime) -> None:
    with pytest.raises(AccessRefused) as refused:
        identify(der(tenant.issue(DEVICE)), {tenant.id: tenant.issuer.certificate}, now)
    assert refused.value.code == "certificate_expired", case


def uri(tenant_id: str, device_id: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(ca.device_uri(tenant_id, device_id))


UNKNOWN_CERTIFICATES: list[tuple[str, list[str], list[x509.GeneralName] | None]] = [
    ("common name and URI name different devices", [DEVICE], [uri("tenant-a", OTHER)]),
    ("no subject alternative name", [DEVICE], None),
    ("no URI among the alternative names", [DEVICE], [x509.DNSName("device.example.com")]),
    ("two device URIs", [DEVICE], [uri("tenant-a", DEVICE), uri("tenant-a", OTHER)]),
    ("no common name", [], [uri("tenant-a", DEVICE)]),
    ("two common names", [DEVICE, DEVICE], [uri("tenant-a", DEVICE)]),
    (
        "a URI that is not a fleetward device",
        [DEVICE],
        [x509.UniformResourceIdentifier(f"https://example.com/{DEVICE}")],
    ),
    (
        "a device URI without a device",
        [DEVICE],
        [x509.UniformResourceIdentifier("urn:fleetward:tenant:tenant-a:device:")],
    ),
    ("a device id that is not 64 hex digits", ["panel-1"], [uri("tenant-a", "panel-1")]),
    ("a device id in upper case", [DEVICE.upper()], [uri("tenant-a", DEVICE.upper())]),
    ("a tenant this hub does not know", [DEVICE], [uri("tenant-z", DEVICE)]),
]


@pytest.mark.parametrize(
    ("common_names", "alternative_names"),
    [pytest.param(names, alternative, id=case) for case, names, alternative in UNKNOWN_CERTIFICATES],
)
def test_a_certificate_that_does_not_name_one_known_device_is_refused(
    tenant: Tenant, common_names: list[str], alternative_names: list[x509.GeneralName] | None
) -> None:
    certificate = tenant.custom(common_names, alternative_names)
    with pytest.raises(AccessRefused) as refused:
        identify(der(certificate), {tenant.id: tenant.issuer.certificate}, NOW)
    assert refused.value.code == "certificate_unknown"


def test_bytes_that_are_not_a_certificate_are_refused(tenant: Tenant) -> None:
    with pytest.raises(AccessRefused) as refused:
        identify(b"\x30\x03\x02\x01\x00", {tenant.id: tenant.issuer.certificate}, NOW)
    assert refused.value.code == "certificate_unknown"


def test_another_tenant_s_ca_cannot_speak_for_this_tenant_s_device(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """TLS accepts it (it chains to a root the hub trusts); the binding to the named tenant refuses it."""
    forged = tenant.custom([DEVICE], [uri(tenant.id, DEVICE)], signer=other_tenant.issuer.key)
    anchors = {tenant.id: tenant.issuer.certificate, other_tenant.id: other_tenant.issuer.certificate}
    with pytest.raises(AccessRefused) as refused:
        identify(der(forged), anchors, NOW)
    assert refused.value.code == "certificate_wrong_tenant"


def test_a_certificate_signed_by_a_key_that_is_not_its_issuing_ca_s_is_refused(tenant: Tenant) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = tenant.custom([DEVICE], [uri(tenant.id, DEVICE)], signer=stranger)
    with pytest.raises(AccessRefused) as refused:
        identify(der(forged), {tenant.id: tenant.issuer.certificate}, NOW)
    assert refused.value.code == "certificate_wrong_tenant"


IDENTITY = PeerIdentity("tenant-a", DEVICE, "1", NOW + dt.timedelta(hours=1))
MAX_KEEP_ALIVE = 1740


GOOD_CONNECT = Connect(
    client_id=DEVICE, keep_alive=60, username=f"hub.example.com/{DEVICE}/?api-version=2021-04-12"
)


@pytest.mark.parametrize(
    "username",
    [
        None,
        f"hub.example.com/{DEVICE}/?api-version=2021-04-12",
        f"hub.example.com/{DEVICE}/?api-version=2021-04-12&DeviceClientType=py-azure-iot-device%2F2.13.0",
        f"hub.example.com/{DEVICE}",
        f"hub.example.com/{DEVICE}/",
        f"127.0.0.1/{quote(DEVICE)}/?api-version=2020-09-30",
    ],
)
def test_the_iot_hub_username_forms_naming_the_device_are_accepted(username: str | None) -> None:
    assert check_connect(replace(GOOD_CONNECT, username=username), IDENTITY, MAX_KEEP_ALIVE) == 60


@pytest.mark.parametrize(
    "username",
    [
        "",
        DEVICE,
        f"hub.example.com/{OTHER}/?api-version=2021-04-12",
        f"{DEVICE}/hub.example.com",
        f"hub.example.com/{DEVICE.upper()}/",
        f"hub.example.com/{DEVICE}x/",
        f"hub.example.com/{DEVICE}/?api-version=" + "x" * 1024,
    ],
)
def test_a_username_that_does_not_name_the_device_is_refused(username: str) -> None:
    with pytest.raises(ConnectRefused) as refused:
        check_connect(replace(GOOD_CONNECT, username=username), IDENTITY, MAX_KEEP_ALIVE)
    assert refused.value.code == "username_mismatch"
    assert refused.value.return_code is ConnectReturnCode.BAD_USERNAME_OR_PASSWORD


REFUSED_CONNECTS: list[tuple[str, Connect, str, ConnectReturnCode]] = [
    (
        "another device's client id",
        replace(GOOD_CONNECT, client_id=OTHER),
        "client_id_mismatch",
        ConnectReturnCode.IDENTIFIER_REJECTED,
    ),
    (
        "an empty client id",
        replace(GOOD_CONNECT, client_id=""),
        "client_id_mismatch",
        ConnectReturnCode.IDENTIFIER_REJECTED,
    ),
    (
        "the client id in upper case",
        replace(GOOD_CONNECT, client_id=DEVICE.upper()),
        "client_id_mismatch",
        ConnectReturnCode.IDENTIFIER_REJECTED,
    ),
    (
        "MQTT 5",
        replace(GOOD_CONNECT, protocol_level=5),
        "protocol_version",
        ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ),
    (
        "an unknown level",
        replace(GOOD_CONNECT, protocol_level=7),
        "protocol_version",
        ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ),
    (
        "a will",
        replace(GOOD_CONNECT, will=Will("t", b"bye", 0, False)),
        "will_refused",
        ConnectReturnCode.NOT_AUTHORIZED,
    ),
]


@pytest.mark.parametrize(
    ("packet", "code", "return_code"),
    [pytest.param(packet, code, rc, id=case) for case, packet, code, rc in REFUSED_CONNECTS],
)
def test_a_connect_that_disagrees_with_its_certificate_is_refused_with_its_connack_code(
    packet: Connect, code: str, return_code: ConnectReturnCode
) -> None:
    with pytest.raises(ConnectRefused) as refused:
        check_connect(packet, IDENTITY, MAX_KEEP_ALIVE)
    assert (refused.value.code, refused.value.return_code) == (code, return_code)


def test_mqtt_3_1_is_spoken_too() -> None:
    assert (
        check_connect(
            replace(GOOD_CONNECT, protocol_level=3, protocol_name="MQIsdp"), IDENTITY, MAX_KEEP_ALIVE
        )
        == 60
    )


@pytest.mark.parametrize(
    ("asked", "held"),
    [(0, MAX_KEEP_ALIVE), (1, 1), (60, 60), (MAX_KEEP_ALIVE, MAX_KEEP_ALIVE), (0xFFFF, MAX_KEEP_ALIVE)],
)
def test_the_keep_alive_is_clamped_to_the_hub_s_maximum_and_zero_means_the_maximum(
    asked: int, held: int
) -> None:
    """IoT Hub holds a device to at most 29 minutes; 0 ("never") would let a dead connection live forever."""
    assert check_connect(replace(GOOD_CONNECT, keep_alive=asked), IDENTITY, MAX_KEEP_ALIVE) == held


def test_the_outbound_window_hands_out_ids_from_1_and_refuses_past_its_size() -> None:
    window: OutboundWindow[str] = OutboundWindow(3)
    assert [window.take(token) for token in "abc"] == [1, 2, 3]
    assert window.full
    assert window.in_flight == 3
    with pytest.raises(ProtocolViolation) as refused:
        window.take("d")
    assert refused.value.code == "window_full"
    assert window.acknowledge(2) == "b"
    assert not window.full
    assert window.take("d") == 4
    assert window.unacknowledged() == ["a", "c", "d"]


def test_an_acknowledgement_for_an_id_not_in_flight_is_a_protocol_violation() -> None:
    window: OutboundWindow[str] = OutboundWindow(3)
    with pytest.raises(ProtocolViolation):
        window.acknowledge(1)
    packet_id = window.take("a")
    assert window.acknowledge(packet_id) == "a"
    with pytest.raises(ProtocolViolation):
        window.acknowledge(packet_id)  # twice


def test_packet_ids_wrap_from_65535_to_1_never_0_and_skip_ids_still_in_flight() -> None:
    window: OutboundWindow[int] = OutboundWindow(2)
    assert window.take(-1) == 1  # held the whole time
    for expected in range(2, 0x10000):
        assert window.take(expected) == expected
        assert window.acknowledge(expected) == expected
    assert window.take(0) == 2  # 1 is still in flight
    assert window.unacknowledged() == [-1, 0]


@given(st.lists(st.booleans(), max_size=200), st.integers(min_value=1, max_value=8))
def test_an_id_in_flight_is_never_handed_out_again(operations: list[bool], size: int) -> None:
    window: OutboundWindow[int] = OutboundWindow(size)
    in_flight: dict[int, int] = {}
    for number, take in enumerate(operations):
        if take and not window.full:
            packet_id = window.take(number)
            assert 1 <= packet_id <= 0xFFFF
            assert packet_id not in in_flight
            in_flight[packet_id] = number
        elif in_flight:
            oldest = next(iter(in_flight))
            assert window.acknowledge(oldest) == in_flight.pop(oldest)
        assert window.in_flight == len(in_flight) <= size


def test_the_token_bucket_allows_its_burst_at_once_then_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    assert [bucket.spend(1, 100.0) for _ in range(5)] == [0.0] * 5
    assert bucket.spend(1, 100.0) == pytest.approx(0.1)  # one message over: wait a tenth of a second
    assert bucket.spend(1, 100.0) == pytest.approx(0.2)  # the debt grows with each message
    assert bucket.spend(1, 100.3) == pytest.approx(0.0)  # 0.3 s later, 3 more were earned: debt paid


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst_only() -> None:
    bucket = TokenBucket(rate=100, burst=10)
    assert bucket.spend(10, 0.0) == 0.0
    assert bucket.spend(5, 0.05) == 0.0  # 5 earned in 50 ms
    assert bucket.spend(1, 0.05) > 0
    idle = TokenBucket(rate=100, burst=10)
    idle.spend(0, 0.0)
    assert idle.spend(10, 3600.0) == 0.0  # an hour idle earns a burst, not 360,000
    assert idle.spend(1, 3600.0) == pytest.approx(0.01)


def test_the_token_bucket_bounds_bytes_as_well_as_messages() -> None:
    bucket = TokenBucket(rate=1024, burst=2048)
    assert bucket.spend(2048, 0.0) == 0.0
    assert bucket.spend(1024, 0.0) == pytest.approx(1.0)


@given(
    st.lists(st.floats(min_value=0, max_value=0.2), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=1, max_value=50),
)
def test_a_client_that_waits_as_told_never_exceeds_burst_plus_rate_times_time(
    gaps: list[float], rate: int, burst: int
) -> None:
    """Whatever its timing, a device that waits as long as it is told sends at most burst + rate·t."""
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    for gap in gaps:
        now += gap
        now += bucket.spend(1, now)  # the hub pauses reading for that long
    assert len(gaps) <= burst + rate * now + 1e-6


def test_the_backlog_is_first_in_first_out_and_refuses_past_its_limit() -> None:
    backlog: Backlog[str] = Backlog(2)
    assert backlog.push("a")
    assert backlog.push("b")
    assert not backlog.push("c")
    assert len(backlog) == 2
    assert [backlog.pop(), backlog.pop(), backlog.pop()] == ["a", "b", None]


def test_a_device_id_is_the_hash_of_its_identity_key() -> None:
    """The certificates above use made-up ids; real ones are SHA-256 over the key, and identify agrees."""
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = device_id_for(key.public_key())
    local = Tenant("tenant-c")
    identity = identify(der(local.issue(device_id)), {local.id: local.issuer.certificate}, NOW)
    assert identity.device_id == device_id


def test_a_trust_bell_listener_stops_being_called_once_it_stops_listening() -> None:
    bell = TrustBell()
    calls: list[str] = []
    stop_first = bell.listen(lambda: calls.append("first"))
    bell.listen(lambda: calls.append("second"))
    bell.ring()
    stop_first()
    stop_first()  # twice is harmless: a hub may stop twice
    bell.ring()
    assert calls == ["first", "second", "second"]


async def test_a_slow_stream_subscriber_loses_the_oldest_messages_and_is_told_how_many() -> None:
    feed = TelemetryFeed(buffer=2)
    at = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)

    def message(tenant_id: str, number: int) -> TelemetryMessage:
        return TelemetryMessage(tenant_id, "d" * 64, at, (), b"%d" % number, id=number)

    follow = feed.follow("tenant-a")
    first = asyncio.create_task(anext(follow))
    await asyncio.sleep(0)  # the subscriber is registered and waiting
    feed.publish([message("tenant-a", n) for n in range(1, 6)] + [message("tenant-b", 99)])
    received = [await first, await anext(follow)]
    await follow.aclose()
    assert [(item.id, missed) for item, missed in received] == [(4, 3), (5, 3)]


def test_the_live_stream_s_batches_carry_the_module_that_sent_a_message() -> None:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    messages = [
        TelemetryMessage("t", "d" * 64, at, (("k", "v"),), b"from the device", id=1),
        TelemetryMessage("t", "d" * 64, at, (), b"from a module", id=2, module_id="fleetward-agent"),
    ]
    assert decode_batch(encode_batch([encode(message) for message in messages])) == messages
