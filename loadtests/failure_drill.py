"""Failure drill: real Triton on CPU behind the gateway under steady load, then killed (SIGKILL),
restarted, hung (SIGSTOP) and resumed, printing a per-second timeline of throughput, errors by
code, the fallback share and the breaker state. Ops use it to rehearse incidents.

    .venv/bin/python loadtests/failure_drill.py [--seconds-per-phase 5] [--concurrency 4]

Loopback only; it starts and stops its own Triton and gateway and ends by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import yaml
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
TRITON = ROOT / "scripts" / "triton-cpu.sh"
ROUTES = {"classifier": {
    "target": {"backend": "triton", "model": "classifier", "version": 1},
    "timeout_s": 0.5,
    "breaker": {"failures": 5, "open_s": 2.0, "half_open_probes": 1},
    "fallback": {"features": {"f0": {"input": "features", "index": 0}}, "outputs": {"probabilities": "FP32"},
                 "rules": [{"name": "f0-high", "when": "f0 > 1.0", "outputs": {"probabilities": [0.8, 0.1, 0.1]}}],
                 "default": {"name": "prior", "outputs": {"probabilities": [0.34, 0.33, 0.33]}}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Drill:
    def __init__(self, workdir: Path) -> None:
        self.ports = {k: free_port() for k in ("t_http", "t_grpc", "t_metrics", "http", "grpc", "admin")}
        self.env = dict(os.environ, TRITON_HTTP_PORT=str(self.ports["t_http"]), TRITON_GRPC_PORT=str(self.ports["t_grpc"]),
                        TRITON_METRICS_PORT=str(self.ports["t_metrics"]))
        self.workdir = workdir
        self.gateway: subprocess.Popen[bytes] | None = None

    def triton_pid(self) -> int:
        return int((ROOT / ".triton" / f"tritonserver-{self.ports['t_http']}.pid").read_text())

    def start_triton(self) -> None:
        subprocess.run([str(TRITON), "start"], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def start_gateway(self) -> None:
        listeners = {k: {"host": "127.0.0.1", "port": self.ports[k]} for k in ("http", "grpc", "admin")}
        config = {"listeners": listeners, "routing_file": "routing.yaml",
                  "backends": {"triton": {"url": f"127.0.0.1:{self.ports['t_grpc']}", "health_interval_s": 0.5}}}
        (self.workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        (self.workdir / "routing.yaml").write_text(yaml.safe_dump({"models": ROUTES}))
        log = open(self.workdir / "gateway.log", "wb")
        self.gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(self.workdir / "gateway.yaml")],
                                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gateway did not become ready")

    def breaker(self) -> str:
        try:
            routes = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/admin/routes", timeout=1).read())
            return routes[0]["targets"][0]["breaker"] or "-"
        except OSError:
            return "?"

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            self.gateway.wait(30)
        try:
            os.kill(self.triton_pid(), signal.SIGCONT)
        except (OSError, ValueError):
            pass
        subprocess.run([str(TRITON), "stop"], env=self.env, check=False, stdout=subprocess.DEVNULL)


async def run(drill: Drill, phase_s: float, concurrency: int) -> None:
    client = grpc_aio.InferenceServerClient(f"127.0.0.1:{drill.ports['grpc']}")
    tensor = grpc_aio.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32))
    seconds: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    phases = [("steady", None), ("SIGKILL triton", lambda: os.kill(drill.triton_pid(), signal.SIGKILL)),
              ("restart triton", drill.start_triton), ("SIGSTOP triton", lambda: os.kill(drill.triton_pid(), signal.SIGSTOP)),
              ("SIGCONT triton", lambda: os.kill(drill.triton_pid(), signal.SIGCONT))]
    end = t0 + phase_s * len(phases)

    async def load() -> None:
        while loop.time() < end:
            try:
                answer = (await client.infer("classifier", [tensor], client_timeout=2.0)).get_response()
                kind = "fallback" if "infergate_fallback" in answer.parameters else "ok"
            except InferenceServerException as e:
                kind = (e.status() or "ERROR").replace("StatusCode.", "")
            seconds[int(loop.time() - t0)][kind] += 1

    async def script() -> None:
        for i, (name, action) in enumerate(phases):
            await asyncio.sleep(max(0.0, t0 + i * phase_s - loop.time()))
            print(f"--- t={i * phase_s:>4.0f}s  {name}", flush=True)
            if action is not None:
                await loop.run_in_executor(None, action)

    async def report() -> None:
        print(f"{'t':>4} {'req/s':>6} {'ok':>6} {'fallback':>9} {'errors':>20}  breaker", flush=True)
        for second in range(int(end - t0)):
            await asyncio.sleep(max(0.0, t0 + second + 1 - loop.time()))
            c = seconds[second]
            errors = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("ok", "fallback")) or "-"
            total = sum(c.values())
            share = f"{c['fallback'] / total:.0%}" if total else "-"
            print(f"{second:>4} {total:>6} {c['ok']:>6} {share:>9} {errors:>20}  {await loop.run_in_executor(None, drill.breaker)}",
                  flush=True)

    await asyncio.gather(script(), report(), *(load() for _ in range(concurrency)))
    await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-phase", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        drill = Drill(Path(tmp))
        try:
            drill.start_triton()
            drill.start_gateway()
            asyncio.run(run(drill, args.seconds_per_phase, args.concurrency))
        finally:
            drill.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
