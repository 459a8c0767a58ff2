"""loadtests/loadgen.py, run as ops run it (a real process with worker processes) against a real
gateway in front of the real Triton: rates, percentiles, errors by code, generator drops, the SLO
verdict and its exit status, the plot, and file:line errors for a bad scenario."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.frontends.grpc import FALLBACK_HEADER, TARGET_HEADER
from tests.conftest import ROOT, Gateway, Launcher

LOADGEN = ROOT / "loadtests" / "loadgen.py"
STEADY = {"name": "steady-test", "phases": [{"name": "steady", "duration_s": 4, "rate": 100}],
          "slo": {"p99_ms": 250, "error_rate": 0.01, "min_achieved_ratio": 0.9}}


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    out: Path

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.out / "result.json").read_text())

    def check(self, name: str) -> dict[str, Any]:
        return next(c for c in self.result["slo"]["checks"] if c["name"] == name)


def loadgen(directory: Path, scenario: dict[str, Any] | str, *args: str) -> Run:
    """Write the scenario (a dict, or YAML text kept as written) and run the generator on it."""
    path = directory / "scenario.yaml"
    path.write_text(scenario if isinstance(scenario, str) else yaml.safe_dump(scenario, sort_keys=False))
    out = directory / "out"
    done = subprocess.run([sys.executable, str(LOADGEN), str(path), "--out", str(out), "--processes", "2", *args],
                          capture_output=True, text=True, timeout=60)
    return Run(done.returncode, done.stdout, done.stderr, out)


@pytest.fixture(scope="module")
def gateway(triton, module_launcher: Launcher) -> Gateway:
    return module_launcher.start(triton.grpc_url)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_steady_rate_is_met_and_measured_on_both_protocols(gateway, tmp_path, protocol):
    port = gateway.grpc_port if protocol == "grpc" else gateway.http_port
    run = loadgen(tmp_path, STEADY, "--target", f"{protocol}://127.0.0.1:{port}")
    assert run.status == 0, run.stderr
    overall = run.result["overall"]
    assert overall["offered"] == 400 and overall["ok"] == 400
    assert abs(overall["achieved_rate"] - 100) <= 10
    q = overall["latency_ms"]
    assert 0 < q["p50"] <= q["p90"] <= q["p99"] <= q["p99_9"]
    assert overall["errors"] == 0 and overall["errors_by_code"] == {} and overall["dropped_by_generator"] == 0
    assert overall["fallback_share"] == 0 and overall["targets"] == {"primary": 400}
    assert [s["t"] for s in run.result["seconds"]] == [0, 1, 2, 3]
    assert sum(s["ok"] for s in run.result["seconds"]) == 400
    assert run.result["slo"]["passed"] and all(c["passed"] for c in run.result["slo"]["checks"])
    assert (run.out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^t=2s \[steady\] rate \d+/100 p99 [\d.]+ms errors 0 fallback 0%$", run.stderr, re.M)
    assert "SLO verdict: PASS" in run.stdout


def test_an_slo_that_cannot_hold_fails_and_names_the_check(gateway, tmp_path):
    scenario = {**STEADY, "phases": [{"name": "short", "duration_s": 2, "rate": 50}], "slo": {"p99_ms": 0.001, "error_rate": 0.01}}
    run = loadgen(tmp_path, scenario, "--target", f"grpc://{gateway.grpc_url}")
    assert run.status == 1, run.stderr
    failed = [c for c in run.result["slo"]["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["p99_ms"]
    assert failed[0]["threshold"] == 0.001 and failed[0]["value"] > 0.001
    assert run.check("error_rate")["passed"] and "SLO verdict: FAIL" in run.stdout


def test_errors_are_counted_by_code(gateway, tmp_path):
    scenario = {**STEADY, "model": "no-such-model", "phases": [{"name": "short", "duration_s": 2, "rate": 50}]}
    run = loadgen(tmp_path, scenario, "--target", f"grpc://{gateway.grpc_url}")
    assert run.status == 1
    overall = run.result["overall"]
    assert overall["errors_by_code"] == {"NOT_FOUND": 100} and overall["error_rate"] == 1.0 and overall["ok"] == 0
    assert run.check("error_rate") == {"name": "error_rate", "value": 1.0, "threshold": 0.01, "passed": False}
    assert "errors by code: NOT_FOUND 100" in run.stdout


def test_requests_over_the_in_flight_cap_are_dropped_and_counted_not_delayed(gateway, tmp_path):
    """`slow` answers after 300 ms: with one request in flight per process, most due requests find
    the cap taken. They count as drops (and errors) instead of waiting, and the run fails."""
    scenario = {**STEADY, "model": "slow", "input": {"name": "DELAY_MS", "shape": [1, 1], "value": 300},
                "max_in_flight": 1, "phases": [{"name": "short", "duration_s": 2, "rate": 20}], "slo": {"p99_ms": 5000}}
    run = loadgen(tmp_path, scenario, "--target", f"http://{gateway.http_url}")
    assert run.status == 1, run.stderr
    overall = run.result["overall"]
    assert overall["dropped_by_generator"] >= 20 and overall["sent"] + overall["dropped_by_generator"] == 40
    assert overall["error_rate"] == pytest.approx(overall["dropped_by_generator"] / 40)
    assert overall["latency_ms"]["p50"] >= 300
    assert run.check("p99_ms")["passed"] and not run.check("generator_dropped")["passed"]
    assert run.result["generator"]["dropped"] == overall["dropped_by_generator"]


def test_a_bad_scenario_exits_2_naming_file_and_line(tmp_path):
    text = ("name: broken\n"
            "phases:\n"
            "  - {name: a, duration_s: 2, rate: 10}\n"
            "  - {name: b, duration_s: 2, rate: 10, ramp: [1, 5]}\n"
            "slo: {p99_ms: 50, p98_ms: 40}\n")
    run = loadgen(tmp_path, text, "--target", "grpc://127.0.0.1:1")
    path = tmp_path / "scenario.yaml"
    assert run.status == 2
    assert f"{path}:4: phases.1: phase 'b' needs exactly one of 'rate' or 'ramp'" in run.stderr
    assert f"{path}:5: slo.p98_ms: unknown key" in run.stderr
    unmanaged = ("name: kill\n"
                 "phases: [{name: a, duration_s: 2, rate: 10}]\n"
                 "events:\n"
                 "  - {at_s: 1, action: kill_backend}\n")
    run = loadgen(tmp_path, unmanaged, "--target", "grpc://127.0.0.1:1")
    assert run.status == 2 and f"{path}:4: events.0.action: kill_backend needs 'managed: true'" in run.stderr
    assert not run.out.exists()


def test_an_unreachable_target_exits_2(tmp_path):
    run = loadgen(tmp_path, STEADY, "--target", "http://127.0.0.1:1")
    assert run.status == 2 and "cannot reach the HTTP target http://127.0.0.1:1" in run.stderr


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """loadgen.py imported as a module (it imports failure_drill from its own directory)."""
    monkeypatch.syspath_prepend(str(LOADGEN.parent))
    return importlib.import_module("loadgen")


def test_schedules_follow_the_phases(module):
    phases = [module.Phase(name="flat", duration_s=2, rate=50), module.Phase(name="ramp", duration_s=4, ramp=[0, 100]),
              module.Phase(name="pause", duration_s=1, rate=0)]
    times = module.arrival_times(phases, False, np.random.default_rng(0))
    assert len(times) == 100 + 200 and np.all(np.diff(times) > 0)
    assert np.allclose(times[:100], np.arange(100) / 50)
    ramp = times[100:]
    assert ramp.min() >= 2 and ramp.max() < 6
    # request k leaves when the expected count 12.5 t^2 reaches k: k < 12.5, 50, 112.5, 200 by t = 1, 2, 3, 4
    assert np.histogram(ramp, bins=[2, 3, 4, 5, 6])[0].tolist() == [13, 37, 63, 87]
    poisson = module.arrival_times(phases[:1] * 20, True, np.random.default_rng(1))
    assert abs(len(poisson) - 2000) < 200 and poisson.max() < 40
    assert module.TARGET_HEADER == TARGET_HEADER and module.FALLBACK_HEADER == FALLBACK_HEADER


def test_shipped_scenarios_are_valid(module):
    for path in sorted((ROOT / "loadtests" / "scenarios").glob("*.yaml")):
        scenario = module.load_scenario(path)
        assert scenario.slo.model_dump(exclude_none=True), path
