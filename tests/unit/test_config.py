"""Every kind of config error names file, line and reason; good files load with defaults."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from tests.routing_cases import BROKEN, GOOD

GATEWAY = """\
backends:
  triton:
    url: 127.0.0.1:8001
routing_file: routing.yaml
"""
ROUTING = """\
models:
  double:
    target: {backend: triton, model: double}
"""


def write(tmp_path: Path, gateway: str = GATEWAY, routing: str = ROUTING) -> Path:
    (tmp_path / "gateway.yaml").write_text(gateway)
    (tmp_path / "routing.yaml").write_text(routing)
    return tmp_path / "gateway.yaml"


def problems(path: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    return [str(p) for p in e.value.problems]


def test_good_files_load_with_defaults(tmp_path):
    loaded = config.load(write(tmp_path))
    assert loaded.gateway.listeners.grpc.port == 9001 and loaded.gateway.listeners.http.port == 9000
    assert loaded.gateway.listeners.admin.port == 9002 and loaded.gateway.workers == 1
    assert loaded.gateway.backends["triton"].transport == "unary"
    assert loaded.routing.models["double"].target.version == ""


def test_route_state_in_redis_loads_with_defaults(tmp_path):
    gateway = config.load(write(tmp_path, GATEWAY + "redis: {url: redis://r:6379/0}\nroute_state: {store: redis}\n")).gateway
    assert gateway.redis is not None and gateway.redis.key_prefix == "infergate:" and gateway.redis.timeout_s == 0.2
    assert gateway.route_state.lease_s == 5.0 and gateway.route_state.check_interval_s == 1.0
    assert config.load(write(tmp_path)).gateway.route_state.store == "file"


def test_shipped_example_configs_are_valid():
    loaded = config.load(Path(__file__).parents[2] / "configs" / "gateway.yaml")
    assert set(loaded.routing.models) >= {"double", "classifier"}


@pytest.mark.parametrize("gateway, routing, expected", [
    ("backends:\n  triton:\n    url: [1, 2\n", ROUTING, "gateway.yaml:4: YAML syntax"),
    (GATEWAY + "wrokers: 2\n", ROUTING, "gateway.yaml:5: wrokers: unknown key"),
    (GATEWAY.replace("url: 127.0.0.1:8001", "url: 127.0.0.1:8001\n    chanels: 2"), ROUTING,
     "gateway.yaml:4: backends.triton.chanels: unknown key"),
    (GATEWAY + "workers: many\n", ROUTING, "gateway.yaml:5: workers: Input should be a valid integer"),
    (GATEWAY + "listeners:\n  grpc: {port: 70000}\n", ROUTING, "gateway.yaml:6: listeners.grpc.port: Input should be less than or equal to 65535"),
    (GATEWAY.replace("127.0.0.1:8001", "localhost"), ROUTING, "gateway.yaml:3: backends.triton.url: expected host:port"),
    (GATEWAY, ROUTING + "    timeout_s: fast\n", "routing.yaml:4: models.double.timeout_s: Input should be a valid number"),
    ("routing_file: routing.yaml\n", ROUTING, "gateway.yaml:1: backends: required key is missing"),
    (GATEWAY, ROUTING.replace("backend: triton", "backend: tritn"),
     "routing.yaml:3: models.double.target.backend: unknown backend 'tritn' (gateway config declares: triton)"),
    (GATEWAY, ROUTING + "  double:\n    target: {backend: triton, model: x}\n", "routing.yaml:4: models.double: duplicate key 'double'"),
    (GATEWAY, ROUTING.replace("model: double}", "model: double, version: latest}"),
     "routing.yaml:3: models.double.target.version: version must be a positive integer"),
    (GATEWAY, "models:\n  double:\n    targt: {backend: triton, model: double}\n", "routing.yaml:3: models.double.targt: unknown key"),
    (GATEWAY.replace("routing.yaml", "missing.yaml"), ROUTING, "gateway.yaml:4: routing_file: no such file"),
    (GATEWAY + "route_state:\n  store: redis\n", ROUTING, "gateway.yaml:6: route_state.store: 'redis' needs a 'redis' section"),
    (GATEWAY + "route_state: {store: etcd}\n", ROUTING, "gateway.yaml:5: route_state.store: Input should be 'file' or 'redis'"),
    (GATEWAY + "redis: {url: redis://r:6379/0, timeout_s: 0}\n", ROUTING, "gateway.yaml:5: redis.timeout_s: Input should be greater than 0"),
])
def test_each_error_kind_names_file_line_and_reason(tmp_path, gateway, routing, expected):
    found = problems(write(tmp_path, gateway, routing))
    assert any(expected in p for p in found), found
    assert all(p.startswith(str(tmp_path)) for p in found)


def test_all_problems_are_reported_at_once(tmp_path):
    found = problems(write(tmp_path, GATEWAY + "workers: 0\ndrain_timeout_s: -1\n"))
    assert len(found) == 2 and ":5: workers" in found[0] and ":6: drain_timeout_s" in found[1]


def test_check_config_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(write(tmp_path))],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                          str(write(tmp_path, GATEWAY + "bogus: 1\n"))], capture_output=True, text=True)
    assert bad.returncode == 1 and "gateway.yaml:5: bogus: unknown key" in bad.stderr


@pytest.mark.parametrize("case", BROKEN)
def test_broken_routing_files_name_line_and_reason(tmp_path, case):
    text, line, reason = BROKEN[case]
    found = problems(write(tmp_path, routing=text))
    assert any(f"routing.yaml:{line}:" in p and reason in p for p in found), found


def test_good_split_routing_loads(tmp_path):
    loaded = config.load(write(tmp_path, routing=GOOD))
    assert {n: t.weight for n, t in loaded.routing.models["classifier"].named_targets().items()} == {"v1": 90, "v2": 10}


@pytest.mark.parametrize("setting, key_text, reason", [
    ("policy: sometimes", None, "audit.policy: Input should be 'drop' or 'fail_closed'"),
    ("signing_key: key.pem", "not a key", "audit.signing_key: "),
    ("signing_key: missing.pem", None, "audit.signing_key: No such file"),
    ("fsync_interval_s: 0", None, "audit.fsync_interval_s: Input should be greater than 0"),
    ("colour: blue", None, "audit.colour: unknown key"),
])
def test_bad_audit_config_names_file_and_line(tmp_path, setting, key_text, reason):
    if key_text is not None:
        (tmp_path / "key.pem").write_text(key_text)
    found = problems(write(tmp_path, GATEWAY + f"audit:\n  dir: audit\n  {setting}\n"))
    assert any(p.startswith(f"{tmp_path / 'gateway.yaml'}:7: {reason}") for p in found), found


def test_an_rsa_key_is_not_an_audit_signing_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    found = problems(write(tmp_path, GATEWAY + "audit:\n  dir: audit\n  signing_key: key.pem\n"))
    assert any("audit.signing_key" in p and "not an Ed25519 private key" in p for p in found), found


REDIS = GATEWAY + "redis:\n  url: redis://127.0.0.1:6379/0\n"


@pytest.mark.parametrize("gateway, routing, expected", [
    (GATEWAY, ROUTING + "limits:\n  global: {rate: 100, burst: 10, scope: global}\n",
     "routing.yaml:5: limits.global.scope: scope 'global' needs a 'redis' section in the gateway config"),
    (GATEWAY, ROUTING + "    rate_limit:\n      rate: 5\n      scope: global\n",
     "routing.yaml:6: models.double.rate_limit.scope: scope 'global' needs a 'redis' section"),
    (REDIS, ROUTING + "limits:\n  per_client: {rate: 100, burst: 10, lease: 5}\n",
     "routing.yaml:5: limits.per_client: 'lease' and 'on_redis_down' apply to scope: global only"),
    (REDIS, ROUTING + "limits:\n  global: {rate: 100, burst: 10, scope: global, lease: 20}\n",
     "routing.yaml:5: limits.global: lease 20 exceeds burst 10"),
    (REDIS, ROUTING + "limits:\n  global: {rate: 100, scope: global, on_redis_down: shrug}\n",
     "routing.yaml:5: limits.global.on_redis_down: Input should be 'fail_open' or 'fail_closed'"),
    (REDIS, ROUTING + "limits:\n  global: {rate: 100, scope: everywhere}\n",
     "routing.yaml:5: limits.global.scope: Input should be 'local' or 'global'"),
    (REDIS.replace("redis://", "http://"), ROUTING, "gateway.yaml:6: redis.url: expected a redis://, rediss:// or unix:// URL"),
    (REDIS + "  timeout_s: 0\n", ROUTING, "gateway.yaml:7: redis.timeout_s: Input should be greater than 0"),
])
def test_bad_global_limits_and_redis_settings_name_file_and_line(tmp_path, gateway, routing, expected):
    found = problems(write(tmp_path, gateway, routing))
    assert any(expected in p for p in found), found


def test_global_limits_load_with_their_defaults(tmp_path):
    routing = ROUTING + "    rate_limit: {rate: 1000, burst: 100, scope: global}\nlimits:\n  per_client: {rate: 5, scope: global}\n"
    loaded = config.load(write(tmp_path, REDIS, routing))
    assert loaded.gateway.redis.key_prefix == "infergate:" and loaded.gateway.redis.timeout_s == 0.2
    model = loaded.routing.models["double"].rate_limit
    assert model.scope == "global" and model.on_redis_down is None and model.lease_size() == 20  # 20 ms of 1000/s
    assert loaded.routing.limits.per_client.lease_size() == 1                                   # never above burst
