"""The registry's producer side and its checks: publish signs a version (its id is the root
digest, so it is immutable), verification names what does not check out, promotions need k of n
approver signatures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.registry.manifest import Manifest
from gateway.registry.publish import promote, publish
from gateway.registry.signing import RegistryRefusal, check_approvals, generate_key, verify_tree
from gateway.registry.store import DirectoryStore

ROOT = Path(__file__).resolve().parents[2]
FILES, CONFIG = ROOT / "models" / "classifier" / "2", ROOT / "models" / "classifier" / "config.pbtxt"


def manifest(**changes) -> Manifest:
    return Manifest(**{"model": "classifier", "training_commit": "abc123", "dataset_snapshot": "snap-7",
                       "trained_at": "2026-11-01T00:00:00Z", "feature_schema_version": "3",
                       "metrics": {"auc": 0.91}, **changes})


@pytest.fixture
def keys(tmp_path):
    for name in ("producer", "stranger", "alice", "bob", "carol"):
        generate_key(tmp_path / f"{name}.pem")
    return tmp_path


@pytest.fixture
def published(tmp_path, keys):
    registry = tmp_path / "registry"
    digest = publish(registry, "classifier", FILES, CONFIG, manifest(), keys / "producer.pem")
    staged = DirectoryStore(registry).fetch("classifier", digest, tmp_path / "staged")
    return registry, digest, staged


def trusted(keys: Path) -> dict[str, Path]:
    return {"producer": keys / "producer.pem.pub"}


def test_a_published_version_verifies_and_its_digest_is_its_id(published, keys, tmp_path):
    registry, digest, staged = published
    assert verify_tree(staged / "model", staged / "model.sig", trusted(keys)) == digest
    assert sorted(p.name for p in (staged / "model").iterdir()) == ["config.pbtxt", "manifest.json", "model.py"]
    assert Manifest.load(staged / "model" / "manifest.json") == manifest()
    again = publish(registry, "classifier", FILES, CONFIG, manifest(), keys / "producer.pem")
    assert again == digest and DirectoryStore(registry).versions("classifier") == [digest]
    other = publish(registry, "classifier", FILES, CONFIG, manifest(training_commit="def456"), keys / "producer.pem")
    assert other != digest  # the manifest is signed: other lineage, other version


@pytest.mark.parametrize("damage, reason", [
    (lambda t: (t / "model.py").write_bytes((t / "model.py").read_bytes()[:-1] + b"#"),
     "file model.py does not match its signed digest"),
    (lambda t: (t / "model.py").unlink(), "missing file: model.py"),
    (lambda t: (t / "extra.bin").write_bytes(b"\0"), "extra file: extra.bin"),
    (lambda t: (t / "link.py").symlink_to(t / "model.py"), "symbolic link in the version: link.py"),
])
def test_damage_is_refused_naming_the_file(published, keys, damage, reason):
    _, _, staged = published
    damage(staged / "model")
    with pytest.raises(RegistryRefusal, match=reason):
        verify_tree(staged / "model", staged / "model.sig", trusted(keys))


def test_an_unknown_signer_an_unsigned_and_a_corrupt_signature_are_refused(published, keys):
    _, _, staged = published
    with pytest.raises(RegistryRefusal, match=r"signed by an unknown key \(trusted: stranger\)"):
        verify_tree(staged / "model", staged / "model.sig", {"stranger": keys / "stranger.pem.pub"})
    (staged / "model.sig").write_text("{}")
    with pytest.raises(RegistryRefusal, match="not a model-signing bundle"):
        verify_tree(staged / "model", staged / "model.sig", trusted(keys))
    (staged / "model.sig").unlink()
    with pytest.raises(RegistryRefusal, match="unsigned"):
        verify_tree(staged / "model", staged / "model.sig", trusted(keys))


def test_promotions_need_k_of_n_distinct_approvers(published, keys):
    registry, digest, _ = published
    approvers = {n: keys / f"{n}.pem.pub" for n in ("alice", "bob", "carol")}
    first = promote(registry, "classifier", digest, "production", keys / "alice.pem", requested_by="ci")
    assert first.seq == 1 and len(first.approvals) == 1
    with pytest.raises(RegistryRefusal, match=r"has 1 valid \(alice\), needs 2 of 3"):
        check_approvals(first.raw, first.approvals, approvers, 2)
    again = promote(registry, "classifier", digest, "production", keys / "alice.pem")
    assert again.seq == 1 and len(again.approvals) == 1  # the same approver counts once
    stranger = promote(registry, "classifier", digest, "production", keys / "stranger.pem")
    with pytest.raises(RegistryRefusal, match="ignored: unknown key"):
        check_approvals(stranger.raw, stranger.approvals, approvers, 2)
    both = promote(registry, "classifier", digest, "production", keys / "bob.pem")
    assert sorted(check_approvals(both.raw, both.approvals, approvers, 2)) == ["alice", "bob"]
    forged = [dict(a, signature=a["signature"][:-8] + "AAAAAAA=") for a in both.approvals]
    with pytest.raises(RegistryRefusal, match="invalid signature by"):
        check_approvals(both.raw, forged, approvers, 1)
    tampered = dict(both.raw, version="0" * 64)  # approvals cover exactly what was promoted
    with pytest.raises(RegistryRefusal, match="has 0 valid"):
        check_approvals(tampered, both.approvals, approvers, 1)


def test_a_new_version_gets_the_next_promotion_and_unknown_digests_are_refused(published, keys):
    registry, digest, _ = published
    promote(registry, "classifier", digest, "staging", keys / "alice.pem")
    other = publish(registry, "classifier", ROOT / "models" / "classifier" / "1", CONFIG,
                    manifest(training_commit="v1"), keys / "producer.pem")
    assert promote(registry, "classifier", other, "staging", keys / "alice.pem").seq == 2
    with pytest.raises(ValueError, match="no version"):
        promote(registry, "classifier", "f" * 64, "staging", keys / "alice.pem")


@pytest.mark.parametrize("changes, reason", [
    ({"trained_at": "yesterday"}, "trained_at"), ({"metrics": {"auc": "high"}}, "metrics"),
    ({"training_commit": ""}, "training_commit"),
])
def test_manifest_validation_names_the_field(changes, reason):
    with pytest.raises(ValueError, match=reason):
        manifest(**changes)
    with pytest.raises(ValueError, match="unknown field"):
        Manifest.from_json(json.dumps({**json.loads(manifest().to_json()), "colour": "blue"}).encode())
