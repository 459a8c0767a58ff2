"""registry-sync against a real Triton in explicit model-control mode: a signed, approved version is
installed and served through the gateway; every other version is refused with its reason and
leaves Triton's repository and loaded versions as they were; `keep` and `rollback` move versions
out; a crash at any step leaves no partial version, and the next pass finishes or cleans up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from gateway.audit.chain import load_public_keys
from gateway.audit.tools import query, verify
from gateway.backends.triton import registry_manifest
from gateway.registry import settings
from gateway.registry.manifest import Manifest
from gateway.registry.publish import promote, publish
from gateway.registry.signing import RegistryRefusal, generate_key, verify_tree
from gateway.registry.sync import FAILPOINT_ENV, Syncer
from tests.conftest import ROOT, OwnTriton, free_port

CLASSIFIER = ROOT / "models" / "classifier"
CLI = [sys.executable, "-m", "gateway", "registry"]


@dataclass
class Env:
    """One model's registry, sync config, state and staging; the Triton and its repository are the test's."""

    root: Path
    model: str
    triton: OwnTriton
    repository: Path
    keys: Path

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def config(self) -> Path:
        return self.root / "sync.yaml"

    @property
    def state(self) -> dict:
        return json.loads((self.root / "state.json").read_text())["models"][self.model]

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.pem"

    def configure(self, **overrides: object) -> None:
        doc = {"registry": {"path": "registry"}, "repository": str(self.repository), "staging": "staging",
               "state": "state.json", "triton": self.triton.grpc_url,
               "signers": {"producer": str(self.keys / "producer.pem.pub")},
               "approvers": {"alice": str(self.keys / "alice.pem.pub"), "bob": str(self.keys / "bob.pem.pub")},
               "approvals": {"standard": 1, "high": 2}, "models": {self.model: {"stage": "production"}},
               "load_timeout_s": 60, **overrides}
        self.config.write_text(yaml.safe_dump(doc))

    def publish(self, files: int = 1, trained_at: str = "2026-01-01T00:00:00Z", commit: str = "c1",
                risk_tier: str = "standard", key: str = "producer") -> str:
        """Sign models/classifier/<files> (links resolved: version 2's model.py is one, and signing
        refuses links) with the classifier's config renamed to this model into the registry."""
        version = self.root / f"files-{files}"
        if not version.exists():
            shutil.copytree(CLASSIFIER / str(files), version, ignore=shutil.ignore_patterns("__pycache__"))
        config = self.root / "config.pbtxt"
        config.write_text((CLASSIFIER / "config.pbtxt").read_text().replace('name: "classifier"', f'name: "{self.model}"'))
        manifest = Manifest(model=self.model, training_commit=commit, dataset_snapshot="snap-1", trained_at=trained_at,
                            feature_schema_version="1", metrics={"auc": 0.91}, risk_tier=risk_tier, producer="tests")
        return publish(self.registry, self.model, version, config, manifest, self.key(key))

    def promote(self, digest: str, *approvers: str) -> None:
        for name in approvers or ("alice",):
            promote(self.registry, self.model, digest, "production", self.key(name), requested_by="tests")

    def version_tree(self, digest: str) -> Path:
        return self.registry / self.model / "versions" / digest / "model"

    def sync(self, *args: str, failpoint: str | None = None) -> tuple[int, list[dict]]:
        """`registry sync --once` (or args) as a process of its own: exit code and the events it printed."""
        env = dict(os.environ, **({FAILPOINT_ENV: failpoint} if failpoint else {}))
        done = subprocess.run([*CLI, *(args or ("sync", "--once")), "--config", str(self.config)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return done.returncode, events

    def sync_here(self) -> list[str]:
        """One pass in this process (quicker, for setting the scene); the actions it took."""
        syncer = Syncer(settings.load(self.config))
        try:
            return [e.action for e in syncer.run_once()]
        finally:
            syncer.close()

    def listing(self) -> list[str]:
        """Every path under the model's repository directory."""
        return sorted(str(p.relative_to(self.repository)) for p in (self.repository / self.model).rglob("*"))

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in (self.repository / self.model).iterdir() if p.name.isdigit())

    def loaded(self) -> set[str]:
        index = grpcclient.InferenceServerClient(self.triton.grpc_url).get_model_repository_index()
        return {m.version for m in index.models if m.name == self.model and m.state == "READY"}

    def signed_as(self, version: int) -> str:
        """The digest whose signature repository version verifies against (ignoring the bytecode
        cache Triton's Python backend writes into a version it loads); AssertionError if none."""
        copy = self.root / "check"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.repository / self.model / str(version), copy, ignore=shutil.ignore_patterns("__pycache__"))
        for digest_dir in (self.registry / self.model / "versions").iterdir():
            try:
                return verify_tree(copy, digest_dir / "model.sig", {"producer": self.keys / "producer.pem.pub"})
            except RegistryRefusal:
                continue
        raise AssertionError(f"repository version {version} verifies against no published signature")


@pytest.fixture
def registry(tmp_path: Path, spawn_triton: Callable[..., OwnTriton]) -> Callable[[str], Env]:
    """Envs for models of the test's own, all served by one Triton in explicit model-control mode."""
    for directory in ("repo", "keys"):
        (tmp_path / directory).mkdir()
    for name in ("producer", "rogue", "alice", "bob"):
        generate_key(tmp_path / "keys" / f"{name}.pem")
    triton = spawn_triton("--model-control-mode=explicit", models=tmp_path / "repo")

    def make(name: str) -> Env:
        (tmp_path / name).mkdir()
        env = Env(tmp_path / name, f"reg-{name}", triton, tmp_path / "repo", tmp_path / "keys")
        env.configure()
        return env

    return make


def actions(events: list[dict]) -> list[str]:
    return [e["action"] for e in events]


def test_a_signed_approved_version_is_installed_and_served_through_the_gateway(registry, start_gateway):
    env = registry("served")
    digest = env.publish(files=1)
    env.promote(digest, "alice")
    code, events = env.sync()
    assert code == 0, events
    assert actions(events) == ["fetched", "verified", "installed", "loaded"]
    assert events[2] == {**events[2], "type": "registry", "model": env.model, "version": digest, "triton_version": "1"}
    assert env.loaded() == {"1"}
    assert [p for p in env.listing() if "__pycache__" not in p] == [
        f"{env.model}/1", f"{env.model}/1/config.pbtxt", f"{env.model}/1/manifest.json", f"{env.model}/1/model.py",
        f"{env.model}/config.pbtxt"]
    assert env.signed_as(1) == digest
    config = grpcclient.InferenceServerClient(env.triton.grpc_url).get_model_config(env.model).config
    manifest = registry_manifest(config, "1")
    assert manifest is not None and manifest["digest"] == digest and manifest["training_commit"] == "c1"
    assert config.parameters["trained_at"].string_value == "2026-01-01T00:00:00Z"

    gw = start_gateway(env.triton.grpc_url, routes={env.model: {"target": {"backend": "triton", "model": env.model,
                                                                           "version": 1}}})
    features = grpcclient.InferInput("features", [2, 8], "FP32")
    features.set_data_from_numpy(np.arange(16, dtype=np.float32).reshape(2, 8) / 16)
    answer = grpcclient.InferenceServerClient(gw.grpc_url).infer(env.model, [features]).as_numpy("probabilities")
    assert answer.shape == (2, 3) and np.allclose(answer.sum(axis=1), 1.0, atol=1e-5)

    assert env.sync() == (0, [])   # nothing new: nothing done


def test_the_daemon_hands_a_new_version_to_the_gateway_canary_counts_and_audits(registry, start_gateway):
    env = registry("daemon")
    first = env.publish(files=1)
    env.promote(first)
    env.sync_here()
    gw = start_gateway(env.triton.grpc_url, routes={env.model: {"targets": {
        "stable": {"backend": "triton", "model": env.model, "version": 1, "weight": 100},
        "canary": {"backend": "triton", "model": env.model, "weight": 0}}}})
    port = free_port()
    env.configure(interval_s=0.2, metrics_port=port, audit={"dir": "audit"}, models={env.model: {"canary": {
        "admin": f"http://127.0.0.1:{gw.admin_port}", "route": env.model, "target": "canary"}}})
    second = env.publish(files=2, commit="c2", trained_at="2026-01-02T00:00:00Z")
    env.promote(second)

    with open(env.root / "daemon.log", "wb") as out:
        daemon = subprocess.Popen([*CLI, "sync", "--config", str(env.config)], cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while _sample(port, "infergate_registry_actions_total", env.model, "proposed") != 1.0:
            assert time.monotonic() < deadline and daemon.poll() is None, (env.root / "daemon.log").read_text()
            time.sleep(0.2)
        assert _sample(port, "infergate_registry_installed_version", env.model) == 2.0
        assert _sample(port, "infergate_registry_actions_total", env.model, "installed") == 1.0
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert env.loaded() == {"1", "2"}
    routes = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/admin/routes").read())
    targets = {t["name"]: t["version"] for r in routes if r["model"] == env.model for t in r["targets"]}
    assert targets == {"stable": "1", "canary": "2"}
    # the manifests reach the gateway through Triton's model config: lineage per target version
    manifests = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/admin/routes/{env.model}/manifests").read())
    by_target = {m["target"]: m["manifest"] for m in manifests}
    assert by_target["canary"]["digest"] == second and by_target["canary"]["training_commit"] == "c2"
    assert by_target["canary"]["trained_at"] == "2026-01-02T00:00:00Z" and by_target["stable"]["digest"] == first

    records = list(query(env.root / "audit", type="registry", model=env.model))
    assert [r["action"] for r in records] == ["fetched", "verified", "installed", "loaded", "proposed"]
    assert records[2]["version"] == second and records[2]["triton_version"] == "2" and records[2]["stream"] == "registry-sync"
    report = verify(env.root / "audit", load_public_keys([env.root / "audit" / "signing-key.pem.pub"]))
    assert report.ok, report.problems


def _sample(port: int, name: str, model: str, action: str | None = None) -> float | None:
    """A registry-sync metric's value for model (and action), from its /metrics; None when absent
    (or not serving yet)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    except OSError:
        return None
    labels = [f'model="{model}"', *([f'action="{action}"'] if action else [])]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_every_unsound_version_is_refused_and_triton_stays_as_it_was(registry):
    env = registry("refused")
    first = env.publish(files=1)
    env.promote(first)
    assert env.sync_here() == ["fetched", "verified", "installed", "loaded"]

    def tampered(tree: Path) -> None:
        data = bytearray((tree / "model.py").read_bytes())
        data[100] ^= 0x01
        (tree / "model.py").write_bytes(bytes(data))

    cases: list[tuple[str, Callable[[], str], str]] = [
        ("a flipped byte", lambda: _with(env, "flip", tampered),
         "file model.py does not match its signed digest (tampered)"),
        ("a missing file", lambda: _with(env, "missing", lambda tree: (tree / "model.py").unlink()),
         "missing file: model.py"),
        ("an extra file", lambda: _with(env, "extra", lambda tree: (tree / "weights.bin").write_bytes(b"\0" * 8)),
         "extra file: weights.bin"),
        ("no signature", lambda: _unsigned(env), "unsigned: no signature file"),
        ("an unknown key", lambda: _promoted(env, env.publish(commit="rogue", key="rogue")),
         "signed by an unknown key (trusted: producer)"),
        ("too few approvals", lambda: _promoted(env, env.publish(commit="high", risk_tier="high")),
         "k of n approvals: has 1 valid (alice), needs 2 of 2"),
        ("an older version", lambda: _promoted(env, env.publish(commit="old", trained_at="2025-12-01T00:00:00Z")),
         "rollback: trained_at 2025-12-01T00:00:00Z is older than installed version 1's 2026-01-01T00:00:00Z"),
    ]
    for what, make, reason in cases:
        digest = make()
        before = env.listing(), env.loaded()
        code, events = env.sync()
        assert code == 1 and events[-1]["action"] == "refused", (what, events)
        assert events[-1]["reason"] == reason and events[-1]["version"] == digest, what
        assert (env.listing(), env.loaded()) == before, what

    # a promotion removed from the registry must not take the model back to an older promotion
    newer = env.publish(commit="newer", trained_at="2026-01-05T00:00:00Z")
    env.promote(newer)
    assert env.sync_here() == ["fetched", "verified", "installed", "loaded"]
    promotions = env.registry / env.model / "promotions" / "production"
    newest = max(promotions.glob("*.json"))
    newest.unlink()
    shutil.rmtree(newest.with_suffix(".approvals"))
    before = env.listing(), env.loaded()
    code, events = env.sync()
    assert code == 1 and actions(events) == ["refused"]
    assert events[0]["reason"] == "rollback: promotion seq 8 is not newer than seq 9 already trusted for stage production"
    assert (env.listing(), env.loaded()) == before == (before[0], {"1", "2"})


def _promoted(env: Env, digest: str) -> str:
    env.promote(digest)
    return digest


def _with(env: Env, commit: str, change: Callable[[Path], object]) -> str:
    """A published version whose tree in the registry was changed after signing, promoted."""
    digest = env.publish(commit=commit, trained_at="2026-01-02T00:00:00Z")
    change(env.version_tree(digest))
    return _promoted(env, digest)


def _unsigned(env: Env) -> str:
    digest = env.publish(commit="unsigned", trained_at="2026-01-02T00:00:00Z")
    (env.version_tree(digest).parent / "model.sig").unlink()
    return _promoted(env, digest)


def test_keep_removes_the_oldest_and_rollback_serves_the_previous_version(registry):
    env = registry("kept")
    env.configure(keep=2)
    digests = []
    for day, files in ((1, 1), (2, 2), (3, 1)):
        digests.append(env.publish(files=files, commit=f"day{day}", trained_at=f"2026-01-0{day}T00:00:00Z"))
        env.promote(digests[-1])
        env.sync_here()
    assert env.versions() == [2, 3] and env.loaded() == {"2", "3"}
    assert {n: v["digest"] for n, v in env.state["installed"].items()} == {"2": digests[1], "3": digests[2]}

    code, events = env.sync("rollback", "--model", env.model)
    assert code == 0 and actions(events) == ["rolled_back"], events
    assert events[0]["version"] == digests[2] and events[0]["triton_version"] == "3"
    assert env.versions() == [2] and env.loaded() == {"2"}
    assert env.sync() == (0, [])   # the rolled-back promotion is not installed again ...

    digests.append(env.publish(commit="day4", trained_at="2026-01-04T00:00:00Z"))
    env.promote(digests[-1])       # ... a newer one is, under a new version number
    code, events = env.sync()
    assert code == 0 and actions(events) == ["fetched", "verified", "installed", "loaded"]
    assert events[2]["triton_version"] == "4" and env.versions() == [2, 4] and env.loaded() == {"2", "4"}


def test_a_crash_at_any_step_leaves_no_partial_version(registry):
    """Each failpoint on a model of its own: v1 installed, v2 promoted, the sync killed at the
    point; then the repository holds only whole signed versions, Triton still serves v1, and the
    next pass ends with both installed."""
    for failpoint in ("fetched", "verified", "renamed", "config_written", "loaded"):
        env = registry(f"crash-{failpoint.replace('_', '-')}")
        first = env.publish(files=1)
        env.promote(first)
        env.sync_here()
        second = env.publish(files=2, commit="c2", trained_at="2026-01-02T00:00:00Z")
        env.promote(second)

        code, _ = env.sync(failpoint=failpoint)
        assert code == 137, failpoint
        assert all(env.signed_as(n) in (first, second) for n in env.versions()), failpoint
        assert "1" in env.loaded(), failpoint

        code, events = env.sync()
        assert code == 0, (failpoint, events)
        assert env.versions() == [1, 2] and env.loaded() == {"1", "2"}, (failpoint, events)
        assert env.signed_as(1) == first and env.signed_as(2) == second, failpoint
        assert not list((env.root / "staging").iterdir()), failpoint
        assert env.state["pending"] is None and env.state["installed"]["2"]["digest"] == second, failpoint
