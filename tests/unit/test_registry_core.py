"""The registry's producer side and its checks: publish signs a version (its id is the root digest,
so it is immutable), verification names the file or key that does not check out, promotions take
increasing seqs and need k of n distinct approvers' signatures."""
from __future__ import annotations

import argparse
import base64
import json
import os
import stat
from pathlib import Path

import orjson
import pytest

from gateway.registry.manifest import Manifest
from gateway.registry.publish import add_registry_arguments, promote, publish, registry_command
from gateway.registry.signing import (RegistryRefusal, check_approvals, generate_key, key_id, root_digest,
                                      sign_promotion, verify_tree)
from gateway.registry.store import DirectoryStore

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = ROOT / "models" / "classifier"
FILES, CONFIG = CLASSIFIER / "2", CLASSIFIER / "config.pbtxt"


def manifest(**changes) -> Manifest:
    return Manifest(**{"model": "classifier", "training_commit": "abc123", "dataset_snapshot": "snap-7",
                       "hyperparameters": {"lr": 0.01, "optimizer": "adam"}, "metrics": {"auc": 0.91},
                       "trained_at": "2026-01-01T00:00:00Z", "feature_schema_version": "3", **changes})


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir()
    for name in ("producer", "stranger", "alice", "bob", "mallory"):
        generate_key(directory / f"{name}.pem")
    return directory


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def digest(registry: Path, keys: Path) -> str:
    return publish(registry, "classifier", FILES, CONFIG, manifest(), keys / "producer.pem")


@pytest.fixture
def staged(registry: Path, digest: str, tmp_path: Path) -> Path:
    return DirectoryStore(registry).fetch("classifier", digest, tmp_path / "staged")


def producer(keys: Path) -> dict[str, Path]:
    return {"producer": keys / "producer.pem.pub"}


# ---------------------------------------------------------------- keys


def test_keys_are_p256_pems_private_to_their_owner_and_never_overwritten(keys):
    assert stat.S_IMODE(os.stat(keys / "alice.pem").st_mode) == 0o600
    kid = key_id((keys / "alice.pem.pub").read_bytes())
    assert len(kid) == 16 and kid != key_id((keys / "bob.pem.pub").read_bytes())
    before = (keys / "alice.pem").read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(keys / "alice.pem")
    assert (keys / "alice.pem").read_bytes() == before
    with pytest.raises(ValueError):
        key_id(b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")


# ---------------------------------------------------------------- publish and verify


def test_a_published_version_is_its_signed_tree_and_verifies_with_the_producer_key(registry, digest, staged, keys):
    assert sorted(p.name for p in (staged / "model").iterdir()) == ["config.pbtxt", "manifest.json", "model.py"]
    assert (staged / "model" / "model.py").read_bytes() == (FILES / "model.py").read_bytes()
    assert Manifest.load(staged / "model" / "manifest.json") == manifest()
    assert root_digest(staged / "model.sig") == digest
    assert verify_tree(staged / "model", staged / "model.sig", producer(keys)) == digest
    # each trusted key is tried until one verifies
    trusted = {"stranger": keys / "stranger.pem.pub", **producer(keys)}
    assert verify_tree(staged / "model", staged / "model.sig", trusted) == digest


def test_publishing_the_same_content_again_is_a_no_op(registry, digest, keys):
    signature = registry / "classifier" / "versions" / digest / "model.sig"
    before = signature.read_bytes()
    assert publish(registry, "classifier", FILES, CONFIG, manifest(), keys / "producer.pem") == digest
    assert signature.read_bytes() == before   # a new signature of the same tree is not stored
    assert DirectoryStore(registry).versions("classifier") == [digest]
    assert not [p for p in (registry / "classifier" / "versions").iterdir() if p.name.startswith(".")]
    other = publish(registry, "classifier", FILES, CONFIG, manifest(training_commit="def456"), keys / "producer.pem")
    assert other != digest   # the manifest is signed: other lineage, other version
    assert DirectoryStore(registry).versions("classifier") == sorted([digest, other])


def test_a_stored_version_with_other_content_is_not_overwritten(registry, digest, keys):
    stored = registry / "classifier" / "versions" / digest / "model" / "model.py"
    stored.write_bytes(stored.read_bytes() + b"# changed\n")
    with pytest.raises(FileExistsError, match="file model.py does not match its signed digest"):
        publish(registry, "classifier", FILES, CONFIG, manifest(), keys / "producer.pem")
    assert stored.read_bytes().endswith(b"# changed\n")


def test_publish_refuses_a_manifest_of_another_model(registry, keys):
    with pytest.raises(ValueError, match="the manifest is for model 'other', not 'classifier'"):
        publish(registry, "classifier", FILES, CONFIG, manifest(model="other"), keys / "producer.pem")
    assert not registry.exists()


def _flip_byte(tree: Path) -> None:
    data = bytearray((tree / "model.py").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tree / "model.py").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_flip_byte, "file model.py does not match its signed digest (tampered)"),
    (lambda tree: (tree / "config.pbtxt").unlink(), "missing file: config.pbtxt"),
    (lambda tree: (tree / "weights.bin").write_bytes(b"\0" * 8), "extra file: weights.bin"),
    (lambda tree: (tree / "helper.py").symlink_to(tree / "model.py"), "symbolic link in the version: helper.py"),
], ids=["flipped-byte", "missing-file", "extra-file", "symlink"])
def test_a_changed_tree_is_refused_naming_the_file(staged, keys, damage, reason):
    damage(staged / "model")
    with pytest.raises(RegistryRefusal) as refused:
        verify_tree(staged / "model", staged / "model.sig", producer(keys))
    assert refused.value.reason == reason


def test_a_symlink_fetched_from_the_registry_stays_a_link_and_is_refused(registry, digest, keys, tmp_path):
    (registry / "classifier" / "versions" / digest / "model" / "data").symlink_to("/etc")
    staged = DirectoryStore(registry).fetch("classifier", digest, tmp_path / "again")
    assert (staged / "model" / "data").is_symlink()
    with pytest.raises(RegistryRefusal, match="symbolic link in the version: data"):
        verify_tree(staged / "model", staged / "model.sig", producer(keys))


def test_a_signature_by_an_unknown_key_is_refused_naming_the_trusted_keys(staged, keys):
    trusted = {"stranger": keys / "stranger.pem.pub", "bob": keys / "bob.pem.pub"}
    with pytest.raises(RegistryRefusal) as refused:
        verify_tree(staged / "model", staged / "model.sig", trusted)
    assert refused.value.reason == "signed by an unknown key (trusted: stranger, bob)"


def test_a_missing_or_corrupted_signature_is_refused(staged, keys):
    signature = staged / "model.sig"
    good = signature.read_bytes()
    signature.write_bytes(good[: len(good) // 2] + b"\xff" + good[len(good) // 2 + 1:])
    with pytest.raises(RegistryRefusal, match="^the signature file is not a model-signing bundle"):
        verify_tree(staged / "model", signature, producer(keys))
    bundle = json.loads(good)
    sig = base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"])
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1])).decode()
    signature.write_text(json.dumps(bundle))
    with pytest.raises(RegistryRefusal, match=r"^the signature does not verify under producer's key \(the bundle was altered"):
        verify_tree(staged / "model", signature, producer(keys))
    signature.unlink()
    with pytest.raises(RegistryRefusal) as refused:
        verify_tree(staged / "model", signature, producer(keys))
    assert refused.value.reason == "unsigned: no signature file"


def test_fetch_refuses_what_the_registry_does_not_hold(registry, digest, tmp_path):
    store = DirectoryStore(registry)
    with pytest.raises(FileNotFoundError, match="no version"):
        store.fetch("classifier", "f" * 64, tmp_path / "x")
    with pytest.raises(ValueError, match="not a model name"):
        store.fetch("../classifier", digest, tmp_path / "x")
    with pytest.raises(ValueError, match="not a version digest"):
        store.fetch("classifier", "../" + digest, tmp_path / "x")
    assert store.models() == ["classifier"]


# ---------------------------------------------------------------- promotions and approvals


@pytest.fixture
def approvers(keys: Path) -> dict[str, Path]:
    return {"alice": keys / "alice.pem.pub", "bob": keys / "bob.pem.pub"}


def test_one_of_two_required_approvals_is_refused_and_two_distinct_approvers_pass(registry, digest, keys, approvers):
    first = promote(registry, "classifier", digest, "production", keys / "alice.pem", requested_by="ci")
    assert (first.seq, first.version, first.requested_by, len(first.approvals)) == (1, digest, "ci", 1)
    with pytest.raises(RegistryRefusal) as refused:
        check_approvals(first.raw, first.approvals, approvers, 2)
    assert refused.value.reason == "k of n approvals: has 1 valid (alice), needs 2 of 2"
    both = promote(registry, "classifier", digest, "production", keys / "bob.pem")
    assert both.seq == 1 and both.raw == first.raw   # joined the same promotion
    assert check_approvals(both.raw, both.approvals, approvers, 2) == ["alice", "bob"]
    assert DirectoryStore(registry).promotions("classifier", "production") == [both]


def test_the_same_approver_twice_counts_once(registry, digest, keys, approvers):
    promotion = promote(registry, "classifier", digest, "production", keys / "alice.pem")
    again = promote(registry, "classifier", digest, "production", keys / "alice.pem")
    assert again.seq == promotion.seq and len(again.approvals) == 1   # stored once per key
    twice = [*promotion.approvals, sign_promotion(promotion.raw, keys / "alice.pem")]
    with pytest.raises(RegistryRefusal, match=r"has 1 valid \(alice\), needs 2 of 2$"):
        check_approvals(promotion.raw, twice, approvers, 2)


def test_unknown_and_invalid_approvals_count_for_nothing_and_are_named(registry, digest, keys, approvers):
    promotion = promote(registry, "classifier", digest, "production", keys / "alice.pem")
    promotion = promote(registry, "classifier", digest, "production", keys / "mallory.pem")
    assert len(promotion.approvals) == 2
    mallory = key_id((keys / "mallory.pem.pub").read_bytes())
    assert check_approvals(promotion.raw, promotion.approvals, approvers, 1) == ["alice"]
    with pytest.raises(RegistryRefusal) as refused:
        check_approvals(promotion.raw, promotion.approvals, approvers, 2)
    assert refused.value.reason == f"k of n approvals: has 1 valid (alice), needs 2 of 2; ignored: unknown key {mallory}"
    # bob's signature over another promotion does not approve this one
    elsewhere = sign_promotion({**promotion.raw, "version": "0" * 64}, keys / "bob.pem")
    with pytest.raises(RegistryRefusal, match=r"has 1 valid \(alice\), needs 2 of 2; ignored: .*invalid signature by bob$"):
        check_approvals(promotion.raw, [*promotion.approvals, elsewhere], approvers, 2)


def test_promotions_take_increasing_seqs_per_stage(registry, digest, keys):
    other = publish(registry, "classifier", CLASSIFIER / "1", CONFIG, manifest(training_commit="v1"), keys / "producer.pem")
    seqs = [promote(registry, "classifier", d, "staging", keys / "alice.pem").seq for d in (digest, other, digest)]
    assert seqs == [1, 2, 3]
    assert promote(registry, "classifier", other, "production", keys / "alice.pem").seq == 1
    staging = DirectoryStore(registry).promotions("classifier", "staging")
    assert [(p.seq, p.version) for p in staging] == [(1, digest), (2, other), (3, digest)]
    with pytest.raises(RegistryRefusal, match=f"the registry has no version {'f' * 64} of classifier"):
        promote(registry, "classifier", "f" * 64, "staging", keys / "alice.pem")


def test_a_promotion_file_that_is_not_what_its_path_names_is_an_error(registry, digest, keys):
    promotion = promote(registry, "classifier", digest, "staging", keys / "alice.pem")
    path = registry / "classifier" / "promotions" / "staging" / "000001.json"
    path.write_bytes(orjson.dumps({**promotion.raw, "seq": 7}))
    with pytest.raises(ValueError, match="000001.json: not the promotion its path names"):
        DirectoryStore(registry).promotions("classifier", "staging")


# ---------------------------------------------------------------- manifest


def test_the_manifest_round_trips_through_its_file():
    original = manifest(risk_tier="high", intended_use="triage", limitations="adults only", producer="ci")
    text = original.to_json()
    assert Manifest.from_json(text) == original
    assert list(json.loads(text)) == sorted(json.loads(text)) and b"\n  " in text   # sorted, indented
    assert original.trained_at_unix == 1767225600.0
    assert manifest(metrics={"auc": 1}).metrics == {"auc": 1.0}


@pytest.mark.parametrize("doc, reason", [
    ({"trained_at": "yesterday"}, "manifest field 'trained_at': 'yesterday' is not an ISO-8601 time"),
    ({"trained_at": "2026-01-01T00:00:00"}, "manifest field 'trained_at': '2026-01-01T00:00:00' is not in UTC"),
    ({"trained_at": "2026-01-01T02:00:00+02:00"}, "manifest field 'trained_at': .* is not in UTC"),
    ({"metrics": {"auc": "high"}}, "manifest field 'metrics': must map names to finite numbers"),
    ({"metrics": {"auc": True}}, "manifest field 'metrics'"),
    ({"hyperparameters": [1]}, "manifest field 'hyperparameters': must be an object"),
    ({"training_commit": ""}, "manifest field 'training_commit': must not be empty"),
    ({"producer": 3}, "manifest field 'producer': must be a string"),
    ({"risk_teir": "low"}, "manifest field 'risk_teir': unknown"),
    ({"dataset_snapshot": None}, "manifest field 'dataset_snapshot': missing"),
])
def test_manifest_validation_names_the_field(doc, reason):
    fields = {**json.loads(manifest().to_json()), **doc}
    data = orjson.dumps({k: v for k, v in fields.items() if v is not None})
    with pytest.raises(ValueError, match=reason):
        Manifest.from_json(data)


def test_a_manifest_file_that_is_not_a_json_object_is_refused():
    with pytest.raises(ValueError, match="manifest: not JSON"):
        Manifest.from_json(b"{")
    with pytest.raises(ValueError, match="manifest: not a JSON object"):
        Manifest.from_json(b"[]")


# ---------------------------------------------------------------- CLI


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_registry_arguments(parser.add_subparsers(dest="registry_command", required=True))
    return registry_command(parser.parse_args(argv))


def test_the_cli_publishes_promotes_and_says_why_it_cannot(tmp_path, capsys):
    key, registry = tmp_path / "producer.pem", tmp_path / "registry"
    assert run("keygen", "--out", str(key)) == 0 and key.exists()
    assert run("publish", "--registry", str(registry), "--model", "classifier", "--files", str(FILES),
               "--config", str(CONFIG), "--key", str(key), "--training-commit", "abc123", "--dataset-snapshot",
               "snap-7", "--hyperparameter", "lr=0.01", "--hyperparameter", "optimizer=adam", "--metric", "auc=0.91",
               "--trained-at", "2026-01-01T00:00:00Z", "--feature-schema-version", "3") == 0
    digest = capsys.readouterr().out.strip().splitlines()[-1]
    assert DirectoryStore(registry).versions("classifier") == [digest]
    assert Manifest.load(registry / "classifier" / "versions" / digest / "model" / "manifest.json") == manifest()
    assert run("promote", "--registry", str(registry), "--model", "classifier", "--version", digest,
               "--stage", "staging", "--key", str(key)) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 1
    assert run("promote", "--registry", str(registry), "--model", "classifier", "--version", "e" * 64,
               "--stage", "staging", "--key", str(key)) == 1
    assert capsys.readouterr().err.strip() == f"infergate registry promote: the registry has no version {'e' * 64} of classifier"
    assert run("keygen", "--out", str(key)) == 1
    assert capsys.readouterr().err.startswith("infergate registry keygen: ")
