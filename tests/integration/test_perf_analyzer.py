"""perf_analyzer (the binary bundled with tritonclient 2.51) drives the gateway unchanged."""
from __future__ import annotations

import csv
import subprocess

import pytest

from tests.conftest import TRITON_SCRIPT


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_through_gateway(triton, module_launcher, tmp_path, protocol):
    gw = module_launcher.start(triton.grpc_url)
    url = gw.grpc_url if protocol == "grpc" else gw.http_url
    out = tmp_path / "perf.csv"
    run = subprocess.run([str(TRITON_SCRIPT), "perf_analyzer", "-m", "double", "-u", url, "-i", protocol,
                          "--shape", "INPUT0:16", "--concurrency-range", "2", "-s", "1000", "-p", "1000",
                          "--max-trials", "3", "-f", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    row = next(csv.DictReader(out.open()))
    assert float(row["Inferences/Second"]) > 10
