"""Benchmark the gateway against direct Triton and a bare gRPC forwarder with perf_analyzer.

Targets alternate within each round, so direct, gateway and forwarder numbers for one case are
taken minutes apart at most; rounds are aggregated by median. See bench/README.md.

    .venv/bin/python bench/run.py [--rounds 2] [--window-ms 3000] [--variant NAME=KEY:VALUE,...]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import psutil
import tritonclient.grpc as triton_grpc
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.certs import CertAuthority  # noqa: E402  (the repo root must be on sys.path first)

BENCH = REPO / "bench"
TRITON_SH = REPO / "scripts" / "triton-cpu.sh"
# The same environment as scripts/triton-cpu.sh, so a Triton it starts elsewhere can be benched.
_TRITON_ENV = {k: os.environ.get(f"TRITON_{k}", d) for k, d in
               (("ADDRESS", "127.0.0.1"), ("HTTP_PORT", "8000"), ("GRPC_PORT", "8001"), ("METRICS_PORT", "8002"))}
TRITON_PIDFILE = Path(os.environ.get("TRITON_HOME", REPO / ".triton")) / f"tritonserver-{_TRITON_ENV['HTTP_PORT']}.pid"
TRITON_URLS = {"grpc": f"{_TRITON_ENV['ADDRESS']}:{_TRITON_ENV['GRPC_PORT']}",
               "http": f"{_TRITON_ENV['ADDRESS']}:{_TRITON_ENV['HTTP_PORT']}"}
TRITON_METRICS = f"http://{_TRITON_ENV['ADDRESS']}:{_TRITON_ENV['METRICS_PORT']}/metrics"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
MODEL = "double"
CLK_TCK = os.sysconf("SC_CLK_TCK")
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024}


class BenchError(Exception):
    """A measurement or a process under test failed; the message says which and why."""


@dataclass(frozen=True)
class Case:
    protocol: str
    payload: str
    concurrency: int

    @property
    def elements(self) -> int:
        """FP32 elements in INPUT0 for the payload size."""
        return payload_bytes(self.payload) // 4

    def label(self) -> str:
        """Short form for progress lines, e.g. `grpc 64B c4`."""
        return f"{self.protocol} {self.payload} c{self.concurrency}"


@dataclass
class Target:
    """Something perf_analyzer can be pointed at; `process` is the tree whose CPU is measured."""

    name: str
    urls: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    description: str = ""
    model: str = MODEL      # the model name perf_analyzer asks this target for
    perf_args: dict[str, list[str]] = field(default_factory=dict)  # extra perf_analyzer args per protocol


@dataclass
class Measurement:
    round: int
    target: str
    protocol: str
    payload: str
    concurrency: int
    infer_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    wall_s: float = 0.0
    triton_requests: int = 0
    proxy_cpu_us: float | None = None
    triton_cpu_us: float = 0.0
    foreign_load: bool = False
    error: str = ""

    def per_request(self, cpu_us: float | None) -> float | None:
        """cpu_us divided by the requests Triton served during the run."""
        return None if cpu_us is None or self.triton_requests <= 0 else cpu_us / self.triton_requests


@dataclass
class Row:
    """One line of the results table: a target's medians for a case."""

    case: Case
    target: str
    ok_rounds: int
    infer_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    ratio: float | None = None
    added_p50_us: float | None = None
    added_p99_us: float | None = None
    proxy_cpu_us_per_req: float | None = None
    triton_cpu_us_per_req: float | None = None
    foreign_load: bool = False
    errors: list[str] = field(default_factory=list)


class BenchCerts:
    """The run's certificates for `tls` variants: a CA, the gateway's server certificate (IP
    127.0.0.1, DNS localhost) and a client certificate with a SPIFFE id for mutual TLS."""

    MODES = ("server", "mutual")
    SPIFFE_ID = "spiffe://bench.infergate/perf-analyzer"

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        ca = CertAuthority(directory, "bench")
        self.ca = ca.pem
        self.server = ca.issue("server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",), server=True)
        self.client = ca.issue("client", uris=(self.SPIFFE_ID,))

    def gateway_tls(self, mode: str) -> dict[str, Any]:
        """gateway.yaml's `tls` section: TLS on http and grpc; `mutual` requires a client certificate."""
        tls: dict[str, Any] = {"cert": str(self.server.cert), "key": str(self.server.key),
                               "listeners": ["http", "grpc"]}
        if mode == "mutual":
            tls |= {"client_ca": str(self.ca), "client_auth": "require"}
        return tls

    def perf_args(self, mode: str) -> dict[str, list[str]]:
        """perf_analyzer's TLS flags per protocol: verify the server against the CA (HTTP: peer and
        host name); `mutual` also presents the client certificate."""
        grpc = ["--ssl-grpc-use-ssl", f"--ssl-grpc-root-certifications-file={self.ca}"]
        http = ["--ssl-https-verify-peer", "1", "--ssl-https-verify-host", "2",
                "--ssl-https-ca-certificates-file", str(self.ca)]
        if mode == "mutual":
            grpc += [f"--ssl-grpc-private-key-file={self.client.key}",
                     f"--ssl-grpc-certificate-chain-file={self.client.cert}"]
            http += ["--ssl-https-client-certificate-file", str(self.client.cert),
                     "--ssl-https-client-certificate-type", "PEM",
                     "--ssl-https-private-key-file", str(self.client.key), "--ssl-https-private-key-type", "PEM"]
        return {"grpc": grpc, "http": http}

    def grpc_client(self, mode: str) -> dict[str, Any]:
        """tritonclient.grpc.InferenceServerClient keyword arguments for the same connection (readiness)."""
        client: dict[str, Any] = {"ssl": True, "root_certificates": str(self.ca)}
        if mode == "mutual":
            client |= {"private_key": str(self.client.key), "certificate_chain": str(self.client.cert)}
        return client


# ---------------------------------------------------------------- arguments


def payload_bytes(text: str) -> int:
    """Bytes in a size like 64B, 64KiB or 1MiB."""
    match = re.fullmatch(r"(\d+)(B|KiB|MiB)", text)
    if not match or int(match[1]) * UNITS[match[2]] % 4:
        raise argparse.ArgumentTypeError(f"payload must be like 64B, 64KiB or 1MiB (a multiple of 4 bytes), got {text!r}")
    return int(match[1]) * UNITS[match[2]]


def csv_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]."""
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    """`1,4,16` -> [1, 4, 16]."""
    try:
        return [int(item) for item in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`name=key:value,key:value` -> (name, overrides); values that are digits become ints."""
    name, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"variant must be NAME=KEY:VALUE,..., got {text!r}")
    overrides: dict[str, Any] = {}
    for item in csv_list(spec):
        key, sep, value = item.partition(":")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"variant setting must be KEY:VALUE, got {item!r} in {text!r}")
        overrides[key] = int(value) if value.isdigit() else value
    return name, overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "gateway.yaml",
                        help="gateway.yaml the variants start from (its routing file is copied)")
    parser.add_argument("--variant", type=parse_variant, action="append", metavar="NAME=KEY:VALUE,...",
                        help="a gateway variant to bench, e.g. stream=transport:stream,workers:2; repeatable. "
                             "workers and other top-level keys set the gateway, `model` the public model to "
                             "measure (default double), `tls` server|mutual TLS on its listeners, "
                             "the rest every backend "
                             "(default: one variant 'gateway' with the config unchanged)")
    parser.add_argument("--routing", type=Path, help="routing file for the variants instead of the config's")
    parser.add_argument("--protocols", type=csv_list, default=["grpc", "http"], help="comma list of grpc, http")
    parser.add_argument("--payloads", type=csv_list, default=["64B", "64KiB"], help="comma list of sizes, e.g. 64B,64KiB")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16],
                        help="comma list of perf_analyzer concurrencies")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window (-p)")
    parser.add_argument("--input-data", default="random",
                        help="perf_analyzer --input-data: random (random bytes, so also NaN and huge values), zero, "
                             "or a JSON file; use zero for routes with validation rules")
    parser.add_argument("--rounds", type=int, default=2, help="alternation rounds; results are their median")
    parser.add_argument("--no-forwarder", action="store_true", help="skip the bare gRPC forwarder target")
    parser.add_argument("--no-record", action="store_true", help="do not append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    for protocol in args.protocols:
        if protocol not in TRITON_URLS:
            parser.error(f"--protocols: unknown protocol {protocol!r} (grpc, http)")
    for payload in args.payloads:
        try:
            payload_bytes(payload)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--payloads: {e}")
    if args.rounds < 1 or args.window_ms < 100 or any(c < 1 for c in args.concurrency):
        parser.error("--rounds and --concurrency must be >= 1, --window-ms >= 100")
    args.variant = args.variant or [("gateway", {})]
    for name, overrides in args.variant:
        if overrides.get("tls", "server") not in BenchCerts.MODES:
            parser.error(f"--variant {name}: tls must be one of {', '.join(BenchCerts.MODES)}, "
                         f"got {overrides['tls']!r}")
    if len({name for name, _ in args.variant} | {"direct", "forwarder"}) != len(args.variant) + 2:
        parser.error("--variant names must be unique and not 'direct' or 'forwarder'")
    return args


# ---------------------------------------------------------------- processes


def free_ports(count: int) -> list[int]:
    """Distinct ports the kernel has just handed out as free on 127.0.0.1."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def start_process(stack: contextlib.ExitStack, command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start command in its own session (so Ctrl-C reaches only the harness) and register its stop."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process, process)
    return process


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process, then SIGKILL it and any of its descendants still alive after grace_s."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a process log, for error messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(process: subprocess.Popen[bytes], grpc_url: str, log: Path, workers: int = 1, timeout_s: float = 30.0,
               client_args: dict[str, Any] | None = None) -> None:
    """Wait until ServerReady through grpc_url says ready and the supervisor has all its workers.
    client_args go to tritonclient's InferenceServerClient (TLS)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{log.name}: exited with {process.returncode} while starting:\n{log_tail(log)}")
        client = triton_grpc.InferenceServerClient(grpc_url, **(client_args or {}))
        try:
            ready = client.is_server_ready(client_timeout=1.0)
        except Exception:  # noqa: BLE001 - not listening yet
            ready = False
        finally:
            client.close()
        workers_up = workers == 1 or len(psutil.Process(process.pid).children()) >= workers
        if ready and workers_up:
            return
        time.sleep(0.2)
    raise BenchError(f"{log.name}: not ready after {timeout_s:.0f}s:\n{log_tail(log)}")


def start_gateway(stack: contextlib.ExitStack, run_dir: Path, base: Path, routing: Path | None, name: str,
                  overrides: dict[str, Any], certs: BenchCerts | None) -> Target:
    """Write the variant's gateway.yaml (free ports, routing copied), check it, start it, wait until ready.
    The override `model` names the public model to measure instead of `double`; `tls` (server or
    mutual) turns on TLS on the listeners with certs, and in perf_analyzer and the readiness check;
    `audit` (drop or fail_closed) turns the audit log on, in the variant's directory."""
    cfg = yaml.safe_load(base.read_text())
    overrides = dict(overrides)
    model = str(overrides.pop("model", MODEL))
    tls = overrides.pop("tls", None)
    if tls is not None:
        assert certs is not None
        cfg["tls"] = certs.gateway_tls(tls)
    variant_dir = run_dir / name
    variant_dir.mkdir()
    audit = overrides.pop("audit", None)
    if audit is not None:
        cfg["audit"] = {"dir": str(variant_dir / "audit"), "policy": audit}
    source = routing or base.parent / cfg.get("routing_file", "routing.yaml")
    shutil.copy(source, variant_dir / "routing.yaml")
    if (source.parent / "profiles").is_dir():  # drift profiles the routing file names relative to itself
        shutil.copytree(source.parent / "profiles", variant_dir / "profiles")
    cfg["routing_file"] = "routing.yaml"
    http, grpc, admin = free_ports(3)
    cfg["listeners"] = {"http": {"host": "127.0.0.1", "port": http}, "grpc": {"host": "127.0.0.1", "port": grpc},
                        "admin": {"host": "127.0.0.1", "port": admin}}
    for backend in cfg["backends"].values():
        backend["url"] = TRITON_URLS["grpc"]  # the Triton whose CPU and request count are measured
    for key, value in overrides.items():
        if key in cfg and not isinstance(cfg[key], dict):
            cfg[key] = value
        else:
            for backend in cfg["backends"].values():
                backend[key] = value
    config = variant_dir / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    check = subprocess.run([PYTHON, "-m", "gateway", "check-config", "--config", str(config)],
                           cwd=REPO, capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"variant {name}: invalid config {config}:\n{check.stdout}{check.stderr}")
    log = run_dir / f"{name}.log"
    process = start_process(stack, [PYTHON, "-m", "gateway", "serve", "--config", str(config), "--log-level", "WARNING"], log)
    urls = {"grpc": f"127.0.0.1:{grpc}", "http": f"{'https://' if tls else ''}127.0.0.1:{http}"}
    wait_ready(process, urls["grpc"], log, workers=int(cfg.get("workers", 1)),
               client_args=certs.grpc_client(tls) if tls else None)
    backend = next(iter(cfg["backends"].values()))
    description = f"transport {backend.get('transport', 'unary')}, workers {cfg.get('workers', 1)}"
    return Target(name, urls, process, description + "".join(f", {k} {v}" for k, v in overrides.items()
                                                             if k not in ("transport", "workers"))
                  + (f", model {model}" if model != MODEL else "") + (f", TLS {tls}" if tls else ""),
                  model, certs.perf_args(tls) if tls else {})


def start_forwarder(stack: contextlib.ExitStack, run_dir: Path) -> Target:
    """Start bench/forwarder.py on a free port in front of Triton's gRPC endpoint."""
    (port,) = free_ports(1)
    url = f"127.0.0.1:{port}"
    log = run_dir / "forwarder.log"
    process = start_process(stack, [PYTHON, str(BENCH / "forwarder.py"), "--listen", url, "--backend", TRITON_URLS["grpc"]], log)
    wait_ready(process, url, log)
    return Target("forwarder", {"grpc": url}, process, "bench/forwarder.py, grpc.aio bytes pass-through")


def ensure_triton(stack: contextlib.ExitStack) -> int:
    """Triton's pid; starts it (and registers its stop) only if `status` says it is not running."""
    if subprocess.run([str(TRITON_SH), "status"], capture_output=True).returncode != 0:
        print("triton not running; starting it (will stop it at the end)", file=sys.stderr)
        subprocess.run([str(TRITON_SH), "start"], check=True, stdout=sys.stderr)
        stack.callback(subprocess.run, [str(TRITON_SH), "stop"], stdout=sys.stderr)
    return int(TRITON_PIDFILE.read_text())


# ---------------------------------------------------------------- measuring


def tree_ticks(pid: int) -> dict[int, int]:
    """utime + stime clock ticks of pid and each of its descendants, from /proc/<pid>/stat."""
    pids = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    ticks = {}
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            ticks[p] = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks


def cpu_us(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU used between two tree_ticks samples; processes born in between count from zero."""
    return sum(t - before.get(p, 0) for p, t in after.items()) * 1e6 / CLK_TCK


def triton_requests() -> int:
    """Triton's nv_inference_request_success for the bench model, all versions."""
    text = urllib.request.urlopen(TRITON_METRICS, timeout=5).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("nv_inference_request_success{") and f'model="{MODEL}"' in line))


def perf_analyzer(target: Target, case: Case, window_ms: int, csv_path: Path,
                  input_data: str = "random") -> dict[str, str]:
    """Run perf_analyzer once against target with fixed windows; its CSV row for the case."""
    command = [str(TRITON_SH), "perf_analyzer", "-m", target.model, "-u", target.urls[case.protocol],
               "-i", case.protocol,
               "--shape", f"INPUT0:{case.elements}", "--concurrency-range", str(case.concurrency),
               "-s", "1000", "-p", str(window_ms), "--input-data", input_data, "-f", str(csv_path),
               *target.perf_args.get(case.protocol, [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=12 * window_ms / 1000 + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"perf_analyzer timed out: {shlex.join(command)}") from None
    if done.returncode != 0 or not csv_path.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:])
        raise BenchError(f"perf_analyzer exited {done.returncode}: {shlex.join(command)}\n{tail}")
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Concurrency") == str(case.concurrency):
                return row
    raise BenchError(f"no row for concurrency {case.concurrency} in {csv_path}")


def measure(target: Target, case: Case, rnd: int, window_ms: int, input_data: str, triton_pid: int,
            csv_path: Path) -> Measurement:
    """One perf_analyzer run with CPU and Triton request counts sampled around it."""
    m = Measurement(rnd, target.name, case.protocol, case.payload, case.concurrency)
    if target.process is not None and target.process.poll() is not None:
        raise BenchError(f"{target.name} exited with {target.process.returncode}")
    proxy_before = tree_ticks(target.process.pid) if target.process else None
    triton_before = tree_ticks(triton_pid)
    requests_before = triton_requests()
    start = time.monotonic()
    row = perf_analyzer(target, case, window_ms, csv_path, input_data)
    m.wall_s = time.monotonic() - start
    m.triton_requests = triton_requests() - requests_before
    m.triton_cpu_us = cpu_us(triton_before, tree_ticks(triton_pid))
    if target.process is not None and proxy_before is not None:
        m.proxy_cpu_us = cpu_us(proxy_before, tree_ticks(target.process.pid))
    m.infer_per_s = float(row["Inferences/Second"])
    m.p50_us = float(row["p50 latency"])
    m.p99_us = float(row["p99 latency"])
    # perf_analyzer cannot have sent more than its measured rate over the whole run (startup
    # included); more requests at Triton means someone else was using it too.
    m.foreign_load = m.triton_requests > 1.2 * m.infer_per_s * m.wall_s + 100
    return m


# ---------------------------------------------------------------- results


def median(values: list[float]) -> float | None:
    """Median, or None for no values."""
    return statistics.median(values) if values else None


def summarize(measurements: list[Measurement], cases: list[Case], targets: list[Target]) -> list[Row]:
    """Median over rounds per case and target; ratios and added latency are paired per round."""
    by_key = {(m.round, m.target, m.protocol, m.payload, m.concurrency): m for m in measurements}
    rounds = sorted({m.round for m in measurements})
    rows = []
    for case in cases:
        for target in targets:
            if case.protocol not in target.urls:
                continue
            runs = [by_key.get((r, target.name, case.protocol, case.payload, case.concurrency)) for r in rounds]
            bases = [by_key.get((r, "direct", case.protocol, case.payload, case.concurrency)) for r in rounds]
            ok = [m for m in runs if m is not None and not m.error]
            pairs = [(m, d) for m, d in zip(runs, bases, strict=True) if m and d and not m.error and not d.error]
            proxy_cpu = [c for m in ok if (c := m.per_request(m.proxy_cpu_us)) is not None]
            triton_cpu = [c for m in ok if (c := m.per_request(m.triton_cpu_us)) is not None]
            rows.append(Row(
                case, target.name, len(ok),
                infer_per_s=median([m.infer_per_s for m in ok]),
                p50_us=median([m.p50_us for m in ok]),
                p99_us=median([m.p99_us for m in ok]),
                ratio=median([m.infer_per_s / d.infer_per_s for m, d in pairs if d.infer_per_s > 0]),
                added_p50_us=median([m.p50_us - d.p50_us for m, d in pairs]),
                added_p99_us=median([m.p99_us - d.p99_us for m, d in pairs]),
                proxy_cpu_us_per_req=median(proxy_cpu),
                triton_cpu_us_per_req=median(triton_cpu),
                foreign_load=any(m.foreign_load for m in ok),
                errors=[m.error for m in runs if m is not None and m.error],
            ))
    return rows


def fmt(value: float | None, spec: str = ".0f", signed: bool = False) -> str:
    """A table cell: the number formatted, or an em dash when missing."""
    if value is None:
        return "—"
    return format(value, ("+" if signed else "") + spec)


def table(rows: list[Row]) -> str:
    """The markdown results table, with footnotes for flagged rows."""
    lines = ["| proto | payload | conc | target | infer/s | p50 µs | p99 µs | × direct | +p50 µs | +p99 µs "
             "| gateway CPU µs/req | Triton CPU µs/req |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        direct = row.target == "direct"
        mark = " †" if row.foreign_load else ""
        failed = f" ({len(row.errors)} failed)" if row.errors else ""
        lines.append(" | ".join([
            f"| {row.case.protocol}", row.case.payload, str(row.case.concurrency), row.target + failed,
            fmt(row.infer_per_s), fmt(row.p50_us), fmt(row.p99_us),
            "1.00" if direct and row.ok_rounds else fmt(row.ratio, ".2f"),
            "—" if direct else fmt(row.added_p50_us, signed=True),
            "—" if direct else fmt(row.added_p99_us, signed=True),
            fmt(row.proxy_cpu_us_per_req) + ("" if direct else mark), fmt(row.triton_cpu_us_per_req) + mark,
        ]) + " |")
    if any(row.foreign_load for row in rows):
        lines.append("\n† Triton served more requests than perf_analyzer sent in some round: other load shared "
                     "Triton, so CPU µs/req is understated.")
    return "\n".join(lines)


def run_header(args: argparse.Namespace, targets: list[Target], started: datetime) -> str:
    """Date, machine, git revision, exact command and what each target was."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    # RESULTS.md itself changes with every run: it does not make the measured code uncommitted
    revision = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/RESULTS.md")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"## {started:%Y-%m-%d %H:%M} UTC · {len(os.sched_getaffinity(0))} × {model} · "
             f"git {revision or '?'}{' (uncommitted changes)' if dirty else ''} · load avg {load}",
             "", f"`{shlex.join(sys.orig_argv)}`", "",
             f"perf_analyzer `-s 1000 -p {args.window_ms} --input-data {args.input_data}` (3 fixed windows per run), "
             f"{args.rounds} alternation round(s), model `{MODEL}`. Targets: direct = Triton; "
             + "; ".join(f"{t.name} = {t.description}" for t in targets if t.process is not None) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM becomes SystemExit and SIGINT KeyboardInterrupt (even if the shell ignored it for a
    background job), so every registered cleanup runs."""
    def exit_on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    run_dir = BENCH / "out" / f"run-{started:%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True)
    cases = [Case(p, s, c) for p in args.protocols for s in args.payloads for c in args.concurrency]
    measurements: list[Measurement] = []
    with interruptible(), contextlib.ExitStack() as stack:
        triton_pid = ensure_triton(stack)
        targets = [Target("direct", dict(TRITON_URLS), description="Triton")]
        certs = BenchCerts(run_dir / "certs") if any("tls" in overrides for _, overrides in args.variant) else None
        targets += [start_gateway(stack, run_dir, args.config, args.routing, name, overrides, certs)
                    for name, overrides in args.variant]
        if not args.no_forwarder and "grpc" in args.protocols:
            targets.append(start_forwarder(stack, run_dir))
        header = run_header(args, targets, started)
        for target in targets:  # first connections and lazy imports stay out of round 1
            for protocol in target.urls.keys() & set(args.protocols):
                perf_analyzer(target, Case(protocol, args.payloads[0], 1), 500, run_dir / "warmup.csv", args.input_data)
        for rnd in range(1, args.rounds + 1):
            for case in cases:
                present = [t for t in targets if case.protocol in t.urls]
                shift = (rnd - 1) % len(present)
                for target in present[shift:] + present[:shift]:
                    csv_path = run_dir / f"r{rnd}-{target.name}-{case.protocol}-{case.payload}-c{case.concurrency}.csv"
                    try:
                        m = measure(target, case, rnd, args.window_ms, args.input_data, triton_pid, csv_path)
                    except BenchError as e:
                        m = Measurement(rnd, target.name, case.protocol, case.payload, case.concurrency, error=str(e))
                        print(f"round {rnd}/{args.rounds} {case.label()} {target.name}: FAILED {e}", file=sys.stderr)
                    else:
                        print(f"round {rnd}/{args.rounds} {case.label()} {target.name}: {m.infer_per_s:.0f} infer/s, "
                              f"p50 {m.p50_us:.0f} µs, p99 {m.p99_us:.0f} µs", file=sys.stderr)
                    measurements.append(m)

    rows = summarize(measurements, cases, targets)
    result = table(rows)
    print(f"{header}\n\n{result}")
    (run_dir / "results.json").write_text(json.dumps({
        "header": header, "command": sys.orig_argv, "measurements": [asdict(m) for m in measurements],
        "rows": [asdict(r) for r in rows],
    }, indent=1))
    if not args.no_record:
        results_md = BENCH / "RESULTS.md"
        if not results_md.exists():
            results_md.write_text("# Benchmark results\n\nAppended by `bench/run.py`; see bench/README.md for the method.\n")
        with open(results_md, "a") as f:
            f.write(f"\n{header}\n\n{result}\n")
    print(f"raw results: {run_dir.relative_to(REPO)}/results.json", file=sys.stderr)
    return 1 if any(m.error for m in measurements) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        sys.exit(f"bench: {e}")
    except KeyboardInterrupt:
        print("bench: interrupted; stopped everything it started", file=sys.stderr)
        sys.exit(130)
