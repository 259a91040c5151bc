"""The pure core of the image repository: roots k-of-n, rotations, delegations, expiry policy."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from fleetward.errors import InvalidInput, UpdateRefused
from fleetward.updates import repository
from fleetward.updates.repository import ExpiryPolicy, OnlineKeys
from fleetward.wire.updates import (
    FLOORS_FIELD,
    ImageKind,
    TargetCustom,
    custom_of,
    delta_path,
    director_role,
    product_paths,
    target_path,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
POLICY = ExpiryPolicy()
MAX = 64 * 1024


def signer() -> CryptoSigner:
    return CryptoSigner(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def online() -> tuple[OnlineKeys, dict[str, CryptoSigner]]:
    signers = {role: signer() for role in ("targets", "snapshot", "timestamp", "director")}
    keys = OnlineKeys(
        *(signers[role].public_key for role in ("targets", "snapshot", "timestamp", "director"))
    )
    return keys, signers


def test_a_proposed_root_names_offline_keys_online_keys_and_the_director(
    online: tuple[OnlineKeys, dict[str, CryptoSigner]],
) -> None:
    keys, _ = online
    offline = [signer() for _ in range(3)]
    root = repository.propose_root([s.public_key for s in offline], 2, keys, now=NOW, policy=POLICY).signed
    assert root.version == 1
    assert root.consistent_snapshot
    assert root.roles[Root.type].threshold == 2
    assert root.roles[Root.type].keyids == [s.public_key.keyid for s in offline]
    assert root.roles[Targets.type].keyids == [keys.targets.keyid]
    assert director_role(root).keyids == [keys.director.keyid]
    assert root.expires == NOW + dt.timedelta(days=365)


@pytest.mark.parametrize(
    ("count", "threshold", "code"),
    [(0, 1, "root_keys_invalid"), (2, 3, "threshold_invalid"), (2, 0, "threshold_invalid")],
)
def test_a_proposal_with_a_threshold_the_keys_cannot_meet_is_refused(
    online: tuple[OnlineKeys, dict[str, CryptoSigner]], count: int, threshold: int, code: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        repository.propose_root(
            [signer().public_key for _ in range(count)], threshold, online[0], now=NOW, policy=POLICY
        )
    assert refused.value.code == code


def test_a_root_is_accepted_with_its_threshold_and_refused_below_it(
    online: tuple[OnlineKeys, dict[str, CryptoSigner]],
) -> None:
    offline = [signer() for _ in range(3)]
    proposal = repository.unsigned_bytes(
        repository.propose_root([s.public_key for s in offline], 2, online[0], now=NOW, policy=POLICY)
    )
    one = repository.sign_root(proposal, offline[:1])
    with pytest.raises(UpdateRefused) as refused:
        repository.verify_root(one, None, max_bytes=MAX)
    assert refused.value.code == "root_threshold_not_met"
    two = repository.sign_root(one, offline[2:])
    accepted = repository.verify_root(two, None, max_bytes=MAX)
    assert accepted.signed.version == 1
    repository.check_online_keys(accepted.signed, online[0])


def test_a_rotation_needs_the_old_and_the_new_threshold_and_the_next_version(
    online: tuple[OnlineKeys, dict[str, CryptoSigner]],
) -> None:
    old = [signer() for _ in range(2)]
    first = repository.propose_root([s.public_key for s in old], 2, online[0], now=NOW, policy=POLICY)
    previous = repository.verify_root(
        repository.sign_root(repository.unsigned_bytes(first), old), None, max_bytes=MAX
    )
    new = [signer() for _ in range(2)]
    rotation = repository.unsigned_bytes(
        repository.propose_root(
            [s.public_key for s in new], 1, online[0], now=NOW, policy=POLICY, previous=previous.signed
        )
    )
    only_new = repository.sign_root(rotation, new[:1])
    with pytest.raises(UpdateRefused, match="previous root"):
        repository.verify_root(only_new, previous, max_bytes=MAX)
    only_old = repository.sign_root(rotation, old)
    with pytest.raises(UpdateRefused, match="its own"):
        repository.verify_root(only_old, previous, max_bytes=MAX)
    one_old = repository.sign_root(rotation, [*new[:1], old[0]])
    with pytest.raises(UpdateRefused, match="previous root"):
        repository.verify_root(one_old, previous, max_bytes=MAX)
    both = repository.sign_root(rotation, [*new[:1], *old])
    assert repository.verify_root(both, previous, max_bytes=MAX).signed.version == 2
    # the same root again, or one that skips a version, is refused
    with pytest.raises(UpdateRefused) as replay:
        repository.verify_root(
            repository.sign_root(repository.unsigned_bytes(first), old), previous, max_bytes=MAX
        )
    assert replay.value.code == "root_version"


def test_a_root_naming_other_online_keys_is_refused(
    online: tuple[OnlineKeys, dict[str, CryptoSigner]],
) -> None:
    other = OnlineKeys(*(signer().public_key for _ in range(4)))
    offline = [signer()]
    root = repository.propose_root([offline[0].public_key], 1, other, now=NOW, policy=POLICY).signed
    with pytest.raises(UpdateRefused) as refused:
        repository.check_online_keys(root, online[0])
    assert refused.value.code == "root_online_keys"


def test_malformed_and_oversized_roots_are_refused_as_input() -> None:
    for data, code in ((b"{", "root_malformed"), (b"x" * (MAX + 1), "root_too_large")):
        with pytest.raises(InvalidInput) as refused:
            repository.verify_root(data, None, max_bytes=MAX)
        assert refused.value.code == code


def test_targets_delegate_one_terminating_role_per_product_and_products_sign_their_images() -> None:
    product_signer = signer()
    targets = repository.build_targets(3, NOW, {"p1": product_signer.public_key}).signed
    assert targets.delegations is not None
    assert targets.delegations.roles is not None
    role = targets.delegations.roles["product-p1"]
    assert role.paths == ["p1/*/*/*"]
    assert role.is_delegated_path("p1/c/1.2/image.tar")
    assert role.terminating
    assert role.keyids == [product_signer.public_key.keyid]
    custom = TargetCustom(
        component_id="11111111-2222-3333-4444-555555555555",
        version="1.2",
        kind=ImageKind.APP,
        product_id="p1",
        publisher_signature="c2ln",
    )
    target = repository.target_file("p1/x/1.2/image.tar", 10, "ab" * 32, custom)
    product = repository.build_product_role("p1", 1, NOW, [target], {"c": "1.0"})
    data = repository.signed_bytes(product, product_signer)
    parsed = Metadata[Targets].from_bytes(data)
    top = Metadata(targets)
    top.verify_delegate("product-p1", parsed)
    assert custom_of(parsed.signed.targets["p1/x/1.2/image.tar"]) == custom
    assert parsed.signed.unrecognized_fields[FLOORS_FIELD] == {"c": "1.0"}
    with pytest.raises(ValueError, match="outside"):
        repository.build_product_role("p2", 1, NOW, [target], {})


def test_the_delegation_is_the_wire_formats_one_product_pattern_covering_images_and_deltas() -> None:
    """One definition of a product's paths (``wire.updates.product_paths``), used by the repository."""
    assert repository.product_paths is product_paths  # type: ignore[attr-defined]
    targets = repository.build_targets(1, NOW, {"p1": signer().public_key}).signed
    assert targets.delegations is not None
    assert targets.delegations.roles is not None
    role = targets.delegations.roles["product-p1"]
    assert role.paths == product_paths("p1")
    component = "11111111-2222-3333-4444-555555555555"
    assert role.is_delegated_path(target_path("p1", component, "1.2"))
    assert role.is_delegated_path(delta_path("p1", component, "1.2", "ab" * 32))
    assert not role.is_delegated_path(target_path("p2", component, "1.2"))


def test_snapshot_lists_targets_and_products_and_timestamp_the_snapshot() -> None:
    snapshot = repository.build_snapshot(4, NOW, {"targets": 2, "product-p1": 5}).signed
    assert {name: meta.version for name, meta in snapshot.meta.items()} == {
        "targets.json": 2,
        "product-p1.json": 5,
    }
    assert isinstance(snapshot, Snapshot)
    timestamp = repository.build_timestamp(7, NOW, 4).signed
    assert isinstance(timestamp, Timestamp)
    assert timestamp.snapshot_meta.version == 4


def test_metadata_is_refreshed_once_less_than_half_its_lifetime_is_left() -> None:
    expires = POLICY.expires("timestamp", NOW)
    assert expires == NOW + dt.timedelta(days=1)
    assert not POLICY.needs_refresh("timestamp", expires, NOW + dt.timedelta(hours=11))
    assert POLICY.needs_refresh("timestamp", expires, NOW + dt.timedelta(hours=13))
    assert POLICY.lifetime("product-p1") == dt.timedelta(days=90)
    assert POLICY.lifetime("snapshot") == dt.timedelta(days=7)
    with pytest.raises(ValueError, match="at least a minute"):
        ExpiryPolicy(timestamp=dt.timedelta(seconds=1))


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("timestamp.json", ("timestamp", None)),
        ("3.root.json", ("root", 3)),
        ("2.product-p1.json", ("product-p1", 2)),
    ],
)
def test_metadata_names_parse(name: str, parsed: tuple[str, int | None]) -> None:
    assert repository.parse_metadata_name(name) == parsed


@pytest.mark.parametrize("name", ["root.json", "x.root.json", "1..json", "1.root", "1234567890.root.json"])
def test_bad_metadata_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        repository.parse_metadata_name(name)


def test_consistent_target_names_split_into_path_and_hash() -> None:
    digest = "a" * 64
    assert repository.consistent_target_name(f"p/c/1/{digest}.image.tar") == ("p/c/1/image.tar", digest)
    for bad in ("p/c/1/image.tar", f"p/c/1/{'g' * 64}.image.tar", f"p/{digest}."):
        with pytest.raises(InvalidInput):
            repository.consistent_target_name(bad)
