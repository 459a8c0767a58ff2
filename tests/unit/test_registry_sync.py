"""registry-sync's pure parts: its config file (errors with file:line), the model config it writes
for Triton, the state file and the rollback rules."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.backends.triton import registry_manifest
from gateway.config import ConfigError
from gateway.registry import settings
from gateway.registry.repository import Installed, ModelState, Pending, State, StateError, Trusted, render_config
from gateway.registry.signing import generate_key

CLASSIFIER = Path(__file__).parents[2] / "models" / "classifier" / "config.pbtxt"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A signer's and an approver's public keys beside the config."""
    for name in ("signer", "alice"):
        generate_key(tmp_path / f"{name}.pem")
    (tmp_path / "repo").mkdir()
    return tmp_path


def config_text(tmp_path: Path, extra: str = "") -> str:
    return ("registry: {path: reg}\nrepository: repo\ntriton: 127.0.0.1:8001\n"
            "signers: {ci: signer.pem.pub}\napprovers: {alice: alice.pem.pub}\n"
            f"approvals: {{standard: 1}}\nmodels:\n  clf: {{}}\n{extra}")


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        settings.load(path)
    return [str(p) for p in e.value.problems]


def test_good_config_loads_with_defaults_and_paths_beside_it(keys):
    path = keys / "sync.yaml"
    path.write_text(config_text(keys))
    loaded = settings.load(path)
    assert loaded.config.keep == 3 and loaded.config.interval_s == 30 and loaded.config.audit is None
    assert loaded.repository == keys / "repo" and loaded.registry == keys / "reg"
    assert loaded.staging == keys / "repo.staging" and loaded.state == keys / "repo.sync-state.json"
    assert loaded.config.models["clf"].stage == "production" and loaded.config.models["clf"].canary is None
    assert loaded.signers == {"ci": keys / "signer.pem.pub"}


def test_shipped_example_parses():
    from gateway.config import parse_file

    config, _ = parse_file(Path(__file__).parents[2] / "configs" / "registry-sync.yaml", settings.SyncConfig)
    assert config.approvals and config.models


@pytest.mark.parametrize("extra, expected", [
    ("keep: 0\n", "sync.yaml:9: keep: Input should be greater than or equal to 1"),
    ("kepe: 2\n", "sync.yaml:9: kepe: unknown key"),
    ("interval_s: soon\n", "sync.yaml:9: interval_s: Input should be a valid number"),
    ("approvals: {high: -1}\n", "approvals: approval counts must be >= 0"),
])
def test_type_errors_name_file_and_line(keys, extra, expected):
    path = keys / "sync.yaml"
    text = config_text(keys)
    if extra.startswith("approvals"):
        text = text.replace("approvals: {standard: 1}\n", extra)
    else:
        text += extra
    path.write_text(text)
    assert any(expected in p for p in problems(path)), problems(path)


def test_models_need_a_known_stage_and_canary_fields(keys):
    path = keys / "sync.yaml"
    path.write_text(config_text(keys).replace("  clf: {}\n", "  clf:\n    stage: qa\n    canary: {admin: http://x}\n"))
    found = problems(path)
    assert any(p.startswith(f"{path}:9: models.clf.stage: Input should be 'production' or 'staging'") for p in found), found
    assert any(p.startswith(f"{path}:10: models.clf.canary.route: required key is missing") for p in found)


def test_triton_address_is_host_port(keys):
    path = keys / "sync.yaml"
    path.write_text(config_text(keys).replace("127.0.0.1:8001", "localhost"))
    assert [p for p in problems(path) if "triton" in p] == [f"{path}:3: triton: expected host:port, got 'localhost'"]


def test_keys_that_do_not_load_and_unreachable_approval_counts(keys):
    (keys / "junk.pem").write_text("not a key\n")
    path = keys / "sync.yaml"
    text = config_text(keys).replace("approvers: {alice: alice.pem.pub}", "approvers: {alice: junk.pem, bob: missing.pem}")
    path.write_text(text.replace("approvals: {standard: 1}", "approvals: {standard: 1, high: 3}"))
    found = problems(path)
    assert any(p.startswith(f"{path}:5: approvers.alice: ") and "junk.pem" in p for p in found), found
    assert any(p.startswith(f"{path}:5: approvers.bob: cannot read") for p in found), found
    assert f"{path}:6: approvals.high: 3 approvals required but only 2 approvers configured" in found


def test_repository_must_exist(keys):
    path = keys / "sync.yaml"
    path.write_text(config_text(keys).replace("repository: repo", "repository: nowhere"))
    assert problems(path) == [f"{path}:2: repository: no such directory {str(keys / 'nowhere')!r}"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
                    reason="needs /dev/shm on another filesystem than the temporary directory")
def test_staging_must_share_the_repository_filesystem(keys):
    path = keys / "sync.yaml"
    path.write_text(config_text(keys) + "staging: /dev/shm/infergate-staging-test\n")
    found = problems(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:9: staging: ") and "filesystem" in found[0]


# ---------------------------------------------------------------- config.pbtxt


def parsed(text: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config


def test_render_config_replaces_version_policy_and_adds_manifests():
    original = CLASSIFIER.read_text()
    assert "version_policy: { all { } }" in original
    manifests = {3: {"trained_at": "2026-02-01T00:00:00Z", "digest": "aa"},
                 5: {"trained_at": "2026-03-01T00:00:00Z", "digest": "bb", "metrics": {"auc": 0.9}}}
    config = parsed(render_config(original, "risk", manifests))
    assert config.name == "risk"
    assert config.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(config.version_policy.specific.versions) == [3, 5]
    assert config.parameters["trained_at"].string_value == "2026-03-01T00:00:00Z"
    assert registry_manifest(config, "5") == manifests[5] and registry_manifest(config, "3") == manifests[3]
    assert registry_manifest(config, "4") is None
    assert config.max_batch_size == 32 and config.backend == "python" and config.input[0].name == "features"


def test_render_config_drops_manifests_of_versions_no_longer_kept():
    first = render_config(CLASSIFIER.read_text(), "risk", {1: {"trained_at": "2026-01-01T00:00:00Z"},
                                                            2: {"trained_at": "2026-01-02T00:00:00Z"}})
    again = parsed(render_config(first, "risk", {2: {"trained_at": "2026-01-02T00:00:00Z"}}))
    assert list(again.version_policy.specific.versions) == [2]
    assert sorted(k for k in again.parameters if k.startswith("infergate_manifest_")) == ["infergate_manifest_2"]


def test_render_config_refuses_text_that_does_not_parse():
    with pytest.raises(ValueError, match="config.pbtxt does not parse"):
        render_config("name: \"x\"\nversion_policy: { lateset { } }\n", "x", {1: {"trained_at": "2026-01-01T00:00:00Z"}})


# ---------------------------------------------------------------- state and rollback rules


def test_state_round_trip(tmp_path):
    state = State()
    m = state.model("clf")
    m.installed[3] = Installed("d3", 4, "2026-01-03T00:00:00Z", "2026-01-04T00:00:00.000000Z")
    m.installed[10] = Installed("d10", 7, "2026-01-05T00:00:00Z", "2026-01-06T00:00:00.000000Z")
    m.trusted["production"] = Trusted(7, "d10")
    m.pending = Pending("d11", 11, "production", 8, "2026-01-07T00:00:00Z")
    m.next_version = 12
    state.model("other")
    path = tmp_path / "state.json"
    state.save(path)
    assert State.load(path) == state
    assert json.loads(path.read_text())["models"]["clf"]["installed"]["10"]["digest"] == "d10"
    assert not path.with_name("state.json.tmp").exists()


def test_missing_state_is_empty_and_broken_state_is_an_error(tmp_path):
    assert State.load(tmp_path / "none.json") == State()
    (tmp_path / "bad.json").write_text('{"format": 1, "models": {"clf": {"installed": 3}}}')
    with pytest.raises(StateError, match="not a sync state file"):
        State.load(tmp_path / "bad.json")
    (tmp_path / "torn.json").write_text('{"format": 1, "mod')
    with pytest.raises(StateError, match="cannot read"):
        State.load(tmp_path / "torn.json")


def model_state() -> ModelState:
    m = ModelState()
    m.installed = {1: Installed("d1", 1, "2026-01-01T00:00:00Z", ""), 2: Installed("d2", 3, "2026-01-02T00:00:00+00:00", "")}
    m.trusted = {"production": Trusted(3, "d2")}
    return m


def test_a_promotion_older_than_the_trusted_one_is_a_rollback():
    m = model_state()
    assert m.rollback_reason("production", 2) == \
        "rollback: promotion seq 2 is not newer than seq 3 already trusted for stage production"
    assert m.rollback_reason("production", 3) is not None   # a different version under a seq already trusted
    assert m.rollback_reason("production", 4) is None
    assert m.rollback_reason("staging", 1) is None            # stages are trusted separately


def test_a_version_trained_before_the_newest_installed_is_a_rollback():
    m = model_state()
    assert m.rollback_reason("production", 4, "2026-01-01T12:00:00Z") == \
        "rollback: trained_at 2026-01-01T12:00:00Z is older than installed version 2's 2026-01-02T00:00:00+00:00"
    assert m.rollback_reason("production", 4, "2026-01-02T00:00:00Z") is None      # same instant, other notation
    assert m.rollback_reason("production", 4, "2026-01-02T01:00:00+02:00") is not None
    assert m.rollback_reason("production", 4, "2026-01-03") is None               # no zone: UTC


def test_handled_promotions_are_not_installed_again():
    m = model_state()
    assert m.handled("production", 3, "d2")       # the trusted promotion
    assert m.handled("production", 9, "d1")       # a promotion of a version already installed
    assert not m.handled("production", 4, "d4")
    del m.installed[2]                            # rolled back: its promotion stays acted on
    assert m.handled("production", 3, "d2") and not m.handled("production", 4, "d2")
