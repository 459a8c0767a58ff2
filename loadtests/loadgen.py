"""Open-loop load generator for the gateway's gRPC and HTTP APIs: requests leave on a precomputed
schedule whatever the answers do, so a slow gateway shows up as latency instead of as fewer
requests (closed-loop tools under-report it). Scenarios are YAML files; see loadtests/README.md.

    .venv/bin/python loadtests/loadgen.py SCENARIO.yaml [--target grpc://HOST:PORT | http://HOST:PORT]
        [--admin http://HOST:PORT] [--processes N] [--out DIR]

Writes DIR/result.json and DIR/latency.png; exit status 0 when the scenario's SLO holds, 1 when it
does not, 2 on a usage or setup error (a bad scenario file is reported as file:line: reason).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import aiohttp
import grpc
import numpy as np
import orjson
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from tritonclient.utils import triton_to_np_dtype

from failure_drill import Drill  # this script's own directory is on sys.path
from gateway.config import ConfigError, Problem, Strict, parse_file
from gateway.protocol.wire import SERVICE, pb

ROOT = Path(__file__).resolve().parent.parent
# The gateway's answer metadata (gateway.frontends.grpc TARGET_HEADER and FALLBACK_HEADER, which
# tests/integration/test_loadgen.py keeps equal): importing that module costs each worker seconds.
TARGET_HEADER = "infergate-target"
FALLBACK_HEADER = "infergate-fallback"
OK_CODES = ("OK", "200")
DROPPED = "DROPPED_BY_GENERATOR"
QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
FLUSH_S = 0.2           # how often a worker ships its records to the parent
REPORT_LAG_S = 0.5      # the progress line for second s waits this long past s + 1 for late records
SIGNALS = {"kill_backend": signal.SIGKILL, "stop_backend": signal.SIGSTOP, "resume_backend": signal.SIGCONT}

# One request's outcome: scheduled offset from the start (s), latency from that scheduled time (s;
# NaN when the generator dropped it), send lag behind schedule (s), code, fallback answer, target.
Record = tuple[float, float, float, str, bool, str]


class SetupError(Exception):
    """The run cannot start or go on (target unreachable, managed servers or a worker failing): exit 2."""


# ---------------------------------------------------------------- the scenario file


class Tensor(Strict):
    """The one input every request carries, each element `value` (0 passes configs/routing.yaml's rules)."""

    name: str = "INPUT0"
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                      "FP16", "BF16", "FP32", "FP64"] = "FP32"
    shape: list[PositiveInt] = [1, 16]
    value: float = 0.0

    def array(self) -> np.ndarray:
        """The tensor's contents as numpy."""
        return np.full(self.shape, self.value, dtype=triton_to_np_dtype(self.datatype))


class Phase(Strict):
    """A stretch of the run at a constant rate, or a linear ramp from one rate to another (requests/s)."""

    name: str
    duration_s: PositiveFloat
    rate: NonNegativeFloat | None = None
    ramp: tuple[NonNegativeFloat, NonNegativeFloat] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> Phase:
        self._exactly_one(f"phase {self.name!r}", "rate", "ramp")
        return self

    @property
    def rates(self) -> tuple[float, float]:
        """The rate at the phase's start and at its end."""
        return self.ramp if self.ramp is not None else (self.rate or 0.0, self.rate or 0.0)


class Slo(Strict):
    """Thresholds checked against the whole run; a threshold left out is not checked."""

    p50_ms: PositiveFloat | None = None
    p90_ms: PositiveFloat | None = None
    p99_ms: PositiveFloat | None = None
    p99_9_ms: PositiveFloat | None = None
    error_rate: float | None = Field(default=None, ge=0, le=1)
    max_fallback_share: float | None = Field(default=None, ge=0, le=1)
    min_achieved_ratio: float | None = Field(default=None, ge=0)


class Event(Strict):
    """Something done to the system under load at `at_s` seconds: a signal to or a restart of the
    managed Triton, or a POST of `body` to the gateway's admin API at `path`."""

    at_s: NonNegativeFloat
    action: Literal["kill_backend", "stop_backend", "resume_backend", "restart_backend", "admin"]
    path: str | None = Field(default=None, pattern=r"^/")
    body: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _path_for_admin(self) -> Event:
        if (self.action == "admin") != (self.path is not None):
            raise ValueError("'path' goes with action 'admin', and only with it")
        return self

    def label(self) -> str:
        """Short form for progress lines and the plot, e.g. `admin /admin/routes/classifier/weights`."""
        return f"admin {self.path}" if self.action == "admin" else self.action


class Scenario(Strict):
    """A scenario file: what to send, on which schedule, what happens meanwhile, and the SLO."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    model: str = "double"
    input: Tensor = Tensor()
    protocol: Literal["grpc", "http"] = "grpc"
    target: str | None = None       # grpc://host:port, http://host:port or host:port (then `protocol`)
    admin: str | None = None        # the gateway's admin listener, for admin events
    managed: bool = False           # start an own Triton and gateway (the failure drill's: route `classifier`)
    arrivals: Literal["constant", "poisson"] = "constant"
    seed: int = 0                   # for poisson arrivals
    timeout_s: PositiveFloat = 5.0  # each request's deadline
    max_in_flight: PositiveInt = 1000  # per worker process; requests over it are dropped and counted
    phases: list[Phase] = Field(min_length=1)
    slo: Slo = Slo()
    events: list[Event] = []

    @property
    def duration_s(self) -> float:
        """The schedule's length: all phases end to end."""
        return sum(p.duration_s for p in self.phases)


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file; problems raise ConfigError as file:line: reason."""
    scenario, doc = parse_file(path, Scenario)
    problems = [Problem(doc.file, doc.line(("events", i, "action")), f"events.{i}.action: {e.action} needs 'managed: true'")
                for i, e in enumerate(scenario.events) if e.action != "admin" and not scenario.managed]
    if scenario.managed and scenario.target is not None:
        problems.append(Problem(doc.file, doc.line(("target",)), "target: a managed scenario starts its own gateway"))
    if problems:
        raise ConfigError(problems)
    return scenario


def endpoint(target: str, protocol: str) -> tuple[str, str]:
    """(protocol, host:port) of grpc://host:port, http://host:port, or host:port in the scenario's protocol."""
    scheme, sep, address = target.partition("://")
    if not sep:
        return protocol, target
    if scheme not in ("grpc", "http"):
        raise SetupError(f"target {target!r}: the scheme must be grpc:// or http://")
    return scheme, address.rstrip("/")


# ---------------------------------------------------------------- the schedule


def arrival_times(phases: Sequence[Phase], poisson: bool, rng: np.random.Generator) -> np.ndarray:
    """Every request's send time (s from the start), in order: request k leaves when the phase's
    expected count reaches k, or at the k-th event of a unit-rate Poisson process (poisson). A ramp's
    expected count is quadratic in time; it is inverted by interpolation."""
    out, start = [], 0.0
    for phase in phases:
        first, last = phase.rates
        t = np.linspace(0.0, phase.duration_s, 4097)
        expected = first * t + (last - first) * t * t / (2 * phase.duration_s)
        total = expected[-1]
        if poisson:
            marks = np.cumsum(rng.exponential(size=int(total + 6 * math.sqrt(total) + 10)))
        else:
            marks = np.arange(math.ceil(total))
        out.append(start + np.interp(marks[marks < total - 1e-9], expected, t))
        start += phase.duration_s
    return np.concatenate(out)


# ---------------------------------------------------------------- worker processes


@dataclass(frozen=True)
class Job:
    """One worker's share of the schedule and how to send."""

    index: int
    offsets: np.ndarray
    protocol: str
    address: str
    model: str
    tensor: Tensor
    timeout_s: float
    max_in_flight: int


Answer = tuple[str, bool, str]  # code, fallback answer, target


class GrpcSender:
    """ModelInfer on one grpc.aio channel; the request is serialized once and answers stay bytes."""

    def __init__(self, job: Job) -> None:
        request = pb.ModelInferRequest(model_name=job.model)
        request.inputs.add(name=job.tensor.name, datatype=job.tensor.datatype, shape=job.tensor.shape)
        request.raw_input_contents.append(job.tensor.array().tobytes())
        self.payload = request.SerializeToString()
        self.address, self.timeout_s = job.address, job.timeout_s
        self.channel = grpc.aio.insecure_channel(job.address)
        self.infer = self.channel.unary_unary(f"/{SERVICE}/ModelInfer")

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.timeout_s)
        except asyncio.TimeoutError:
            raise SetupError(f"cannot reach the gRPC target {self.address}") from None

    async def send(self) -> Answer:
        call = self.infer(self.payload, timeout=self.timeout_s)
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        trailers = await call.trailing_metadata()
        return code, trailers.get(FALLBACK_HEADER) is not None, trailers.get(TARGET_HEADER) or ""

    async def close(self) -> None:
        await self.channel.close()


class HttpSender:
    """POST /v2/models/{model}/infer with a JSON body built once, on one aiohttp session."""

    def __init__(self, job: Job) -> None:
        tensor = job.tensor
        self.base = f"http://{job.address}"
        self.url = f"{self.base}/v2/models/{job.model}/infer"
        self.body = orjson.dumps({"inputs": [{"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape,
                                              "data": tensor.array().ravel().tolist()}]})
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=job.max_in_flight),
                                             timeout=aiohttp.ClientTimeout(total=job.timeout_s))

    async def connect(self) -> None:
        try:
            async with self.session.get(f"{self.base}/v2/health/live") as r:
                await r.read()
        except aiohttp.ClientConnectionError as e:
            raise SetupError(f"cannot reach the HTTP target {self.base}: {e}") from None

    async def send(self) -> Answer:
        try:
            async with self.session.post(self.url, data=self.body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return str(r.status), FALLBACK_HEADER in r.headers, r.headers.get(TARGET_HEADER, "")
        except asyncio.TimeoutError:
            return "TIMEOUT", False, ""

    async def close(self) -> None:
        await self.session.close()


async def drive(job: Job, sender: GrpcSender | HttpSender, t0: float, results: Any) -> None:
    """Send each request of the share at its scheduled time, never waiting for earlier answers; a
    request due while max_in_flight are unanswered is dropped and recorded as such, so the
    generator's limit shows in the results instead of silently delaying the schedule."""
    batch: list[Record] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(offset: float) -> None:
        lag = time.monotonic() - t0 - offset
        try:
            code, fallback, target = await sender.send()
        except Exception as e:  # noqa: BLE001 - anything unclassified is counted under its exception name
            code, fallback, target = type(e).__name__, False, ""
        batch.append((offset, time.monotonic() - t0 - offset, lag, code, fallback, target))

    def flush() -> None:
        nonlocal batch
        if batch:
            results.put(("records", job.index, batch))
            batch = []

    async def flush_often() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()

    flusher = asyncio.create_task(flush_often())
    for offset in job.offsets.tolist():
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= job.max_in_flight:
            batch.append((offset, math.nan, 0.0, DROPPED, False, ""))
            continue
        task = asyncio.create_task(one(offset))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)
    flusher.cancel()
    flush()


async def serve_share(job: Job, results: Any, go: Any, start: Any) -> None:
    """Connect and warm up (one unrecorded request), say ready, wait for the common start, drive."""
    sender = GrpcSender(job) if job.protocol == "grpc" else HttpSender(job)
    try:
        try:
            await sender.connect()
        except SetupError as e:
            results.put(("failed", job.index, str(e)))
            return
        await sender.send()
        results.put(("ready", job.index, None))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await drive(job, sender, start.value, results)
        results.put(("done", job.index, None))
    finally:
        await sender.close()


def worker(job: Job, results: Any, go: Any, start: Any) -> None:
    """A worker process's entry point."""
    asyncio.run(serve_share(job, results, go, start))


# ---------------------------------------------------------------- statistics


def summarize(records: Sequence[Record], offered: int, start: float, end: float) -> dict[str, Any]:
    """Stats of some requests offered in the window [start, end) (per second: answered in it).
    Latency counts every answer, errors included, from its scheduled send time; the achieved rate
    is the OK answers (fallbacks included) over the time from `start` to the later of `end` and the
    last answer; the error rate counts generator drops as errors."""
    codes = Counter(r[3] for r in records)
    dropped = codes.pop(DROPPED, 0)
    ok = sum(codes.pop(c, 0) for c in OK_CODES)
    answered = [r for r in records if r[3] != DROPPED]
    latencies = np.array([r[1] for r in answered])
    last = max((r[0] + r[1] for r in answered), default=end)
    achieved = ok / (max(end, last) - start)
    offered_rate = offered / (end - start)
    quantiles = np.percentile(latencies, list(QUANTILES.values())) * 1e3 if latencies.size else [None] * len(QUANTILES)
    fallback = sum(1 for r in records if r[4])
    return {
        "offered": offered, "offered_rate": round(offered_rate, 3), "sent": len(answered), "ok": ok,
        "achieved_rate": round(achieved, 3), "achieved_ratio": round(achieved / offered_rate, 4) if offered else None,
        "latency_ms": {k: None if q is None else round(float(q), 3) for k, q in zip(QUANTILES, quantiles)},
        "errors": sum(codes.values()), "errors_by_code": dict(codes.most_common()),
        "error_rate": round((sum(codes.values()) + dropped) / len(records), 5) if records else 0.0,
        "fallback": fallback, "fallback_share": round(fallback / ok, 5) if ok else 0.0,
        "dropped_by_generator": dropped,
        "targets": dict(Counter(r[5] for r in answered if r[5]).most_common()),
    }


def verdict(slo: Slo, overall: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Each threshold the scenario sets against the whole run's value, plus two that always hold: no
    request dropped by the generator (else the latencies miss the slowest moments) and, when the
    scenario has events, every event applied."""
    latency = overall["latency_ms"]
    values = {"p50_ms": latency["p50"], "p90_ms": latency["p90"], "p99_ms": latency["p99"], "p99_9_ms": latency["p99_9"],
              "error_rate": overall["error_rate"], "max_fallback_share": overall["fallback_share"],
              "min_achieved_ratio": overall["achieved_ratio"]}
    checks = []
    for name, threshold in slo.model_dump(exclude_none=True).items():
        value = values[name]
        passed = value is not None and (value >= threshold if name.startswith("min_") else value <= threshold)
        checks.append({"name": name, "value": value, "threshold": threshold, "passed": passed})
    dropped = overall["dropped_by_generator"]
    checks.append({"name": "generator_dropped", "value": dropped, "threshold": 0, "passed": dropped == 0})
    if events:
        failed = sum(1 for e in events if e["error"])
        checks.append({"name": "events_failed", "value": failed, "threshold": 0, "passed": failed == 0})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


class Collector:
    """Worker records as they arrive, grouped by the second of their answer (a drop: of its send
    time); answers after the schedule's end count in its last second."""

    def __init__(self, scenario: Scenario, offsets: np.ndarray) -> None:
        self.records: list[Record] = []
        self.by_second: dict[int, list[Record]] = defaultdict(list)
        self.offered = np.bincount(offsets.astype(int), minlength=math.ceil(scenario.duration_s))
        self.last = len(self.offered) - 1
        self.phases = scenario.phases

    def add(self, records: list[Record]) -> None:
        self.records += records
        for r in records:
            self.by_second[min(self.last, int(r[0] if math.isnan(r[1]) else r[0] + r[1]))].append(r)

    def second(self, s: int) -> dict[str, Any]:
        return {"t": s, **summarize(self.by_second[s], int(self.offered[s]), s, s + 1)}

    def phase_at(self, t: float) -> str:
        """The name of the phase at t seconds."""
        end = 0.0
        for phase in self.phases[:-1]:
            end += phase.duration_s
            if t < end:
                return phase.name
        return self.phases[-1].name

    def progress(self, s: int) -> str:
        """The progress line for second s, e.g. `t=12s [steady] rate 480/500 p99 8.1ms errors 0 fallback 0%`."""
        stats = self.second(s)
        p99 = stats["latency_ms"]["p99"]
        dropped = f" dropped {stats['dropped_by_generator']}" if stats["dropped_by_generator"] else ""
        return (f"t={s + 1}s [{self.phase_at(s)}] rate {stats['ok']}/{stats['offered']} "
                f"p99 {'-' if p99 is None else f'{p99:.1f}ms'} errors {stats['errors']} "
                f"fallback {stats['fallback_share']:.0%}{dropped}")


# ---------------------------------------------------------------- the run


def apply(event: Event, backend: Drill | None, admin: str | None) -> None:
    """Do one event; raises OSError or CalledProcessError when it cannot be done."""
    if event.action == "admin":
        request = urllib.request.Request(f"{admin}{event.path}", data=json.dumps(event.body or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).close()
    elif event.action == "restart_backend":
        backend.start_triton()  # type: ignore[union-attr]  (backend events require managed: true)
    else:
        os.kill(backend.triton_pid(), SIGNALS[event.action])  # type: ignore[union-attr]


def run_events(events: Sequence[Event], t0: float, backend: Drill | None, admin: str | None,
               log: list[dict[str, Any]]) -> None:
    """Apply the events in order, each at its time, and note when each ran, how long it took and any error."""
    for event in sorted(events, key=lambda e: e.at_s):
        time.sleep(max(0.0, t0 + event.at_s - time.monotonic()))
        began = time.monotonic()
        print(f"--- t={began - t0:.1f}s {event.label()}", file=sys.stderr, flush=True)
        try:
            apply(event, backend, admin)
            error = None
        except (OSError, ValueError, subprocess.CalledProcessError) as e:
            error = str(e)
            print(f"--- {event.label()} FAILED: {error}", file=sys.stderr, flush=True)
        log.append({"at_s": event.at_s, "action": event.action, "path": event.path, "label": event.label(),
                    "ran_at_s": round(began - t0, 3), "took_s": round(time.monotonic() - began, 3), "error": error})


def receive(results: Any, procs: Sequence[multiprocessing.process.BaseProcess], timeout: float) -> tuple | None:
    """The next worker message, or None after timeout; a worker that died is a SetupError."""
    try:
        return results.get(timeout=max(0.0, timeout))
    except queue.Empty:
        for p in procs:
            if p.exitcode not in (None, 0):
                raise SetupError(f"worker {p.name} exited with status {p.exitcode}") from None
        return None


def generate(scenario: Scenario, protocol: str, address: str, admin: str | None, backend: Drill | None,
             processes: int, stack: contextlib.ExitStack) -> tuple[Collector, list[dict[str, Any]]]:
    """Run the schedule on worker processes (equal, interleaved shares), print a progress line each
    second and apply the events; returns the records and the events' log."""
    offsets = arrival_times(scenario.phases, scenario.arrivals == "poisson", np.random.default_rng(scenario.seed))
    context = multiprocessing.get_context("spawn")  # no fork of a parent that has imported grpc
    results, go, start = context.Queue(), context.Event(), context.Value("d", 0.0)
    procs = [context.Process(target=worker, name=f"loadgen-{i}", daemon=True, args=(
        Job(i, offsets[i::processes], protocol, address, scenario.model, scenario.input, scenario.timeout_s,
            scenario.max_in_flight), results, go, start)) for i in range(processes)]
    for p in procs:
        p.start()
        stack.callback(lambda p=p: p.is_alive() and p.terminate())
    ready, deadline = 0, time.monotonic() + 30 + 2 * scenario.timeout_s
    while ready < processes:
        message = receive(results, procs, deadline - time.monotonic())
        if message is None:
            raise SetupError("worker processes did not get ready in time")
        if message[0] == "failed":
            raise SetupError(message[2])
        ready += 1

    collector = Collector(scenario, offsets)
    events: list[dict[str, Any]] = []
    t0 = start.value = time.monotonic() + 0.25
    go.set()
    director = threading.Thread(target=run_events, args=(scenario.events, t0, backend, admin, events), daemon=True)
    director.start()
    done, shown = 0, 0
    while done < processes:  # the last second's line waits for the last answers
        wake = t0 + shown + 1 + REPORT_LAG_S if shown < collector.last else time.monotonic() + 1
        message = receive(results, procs, wake - time.monotonic())
        if message is not None and message[0] == "records":
            collector.add(message[2])
        elif message is not None:
            done += 1
        while shown < collector.last and time.monotonic() >= t0 + shown + 1 + REPORT_LAG_S:
            print(collector.progress(shown), file=sys.stderr, flush=True)
            shown += 1
    for s in range(shown, collector.last + 1):
        print(collector.progress(s), file=sys.stderr, flush=True)
    director.join()
    return collector, events


def report(scenario: Scenario, collector: Collector, events: list[dict[str, Any]], target: str,
           processes: int, started: datetime) -> dict[str, Any]:
    """result.json's document: overall, per-phase and per-second stats, the events and the SLO verdict."""
    records = collector.records
    overall = summarize(records, len(records), 0.0, scenario.duration_s)
    phases, begin = [], 0.0
    for phase in scenario.phases:
        end = begin + phase.duration_s
        inside = [r for r in records if begin <= r[0] < end]
        phases.append({"name": phase.name, "start_s": begin, "end_s": end, **summarize(inside, len(inside), begin, end)})
        begin = end
    lags = np.array([r[2] for r in records if r[3] != DROPPED]) * 1e3
    return {
        "scenario": scenario.model_dump(), "target": target, "started_at": started.isoformat(timespec="seconds"),
        "duration_s": scenario.duration_s,
        "generator": {"processes": processes, "max_in_flight_per_process": scenario.max_in_flight,
                      "dropped": overall["dropped_by_generator"],
                      "send_lag_ms": {"p50": round(float(np.percentile(lags, 50)), 3), "p99": round(float(np.percentile(lags, 99)), 3),
                                      "max": round(float(lags.max()), 3)} if lags.size else None},
        "overall": overall, "phases": phases,
        "seconds": [collector.second(s) for s in range(collector.last + 1)],
        "events": events, "slo": verdict(scenario.slo, overall, events),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """latency.png: p50 and p99 per second above errors, generator drops and fallback answers per
    second, with phase boundaries and events marked."""
    import matplotlib  # here, not at the top: worker processes import this module and never plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    seconds = result["seconds"]
    t = np.array([s["t"] for s in seconds], dtype=float)
    fig, (latency, failures) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=[2, 1])
    for name in ("p50", "p99"):
        values = [np.nan if s["latency_ms"][name] is None else s["latency_ms"][name] for s in seconds]
        latency.plot(t + 0.5, values, marker=".", label=name)
    if result["scenario"]["slo"]["p99_ms"] is not None:
        latency.axhline(result["scenario"]["slo"]["p99_ms"], color="tab:red", linestyle="-.", linewidth=0.8, label="SLO p99")
    latency.set_yscale("log")
    latency.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    latency.yaxis.set_minor_formatter(NullFormatter())
    latency.set_ylabel("latency from scheduled send (ms)")
    latency.set_title(f"{result['scenario']['name']}: {result['target']}")
    errors = np.array([s["errors"] for s in seconds])
    failures.bar(t, errors, width=1.0, align="edge", color="tab:red", label="errors")
    failures.bar(t, [s["dropped_by_generator"] for s in seconds], width=1.0, align="edge", bottom=errors,
                 color="tab:purple", label="dropped by generator")
    fallback = [s["fallback"] for s in seconds]
    failures.plot(t + 0.5, fallback, color="tab:orange", marker=".", label="fallback answers")
    failures.yaxis.set_major_locator(MaxNLocator(integer=True))
    failures.set_ylim(0, 1.15 * max(1, *fallback, *(errors + [s["dropped_by_generator"] for s in seconds])))
    failures.set_ylabel("per second")
    failures.set_xlabel("seconds since start")
    for phase in result["phases"]:
        for axes in (latency, failures):
            axes.axvline(phase["start_s"], color="grey", linestyle="--", linewidth=0.8)
        latency.text(phase["start_s"], 1.0, f" {phase['name']}", transform=latency.get_xaxis_transform(), va="top", fontsize=8)
    for event in result["events"]:
        for axes in (latency, failures):
            axes.axvline(event["ran_at_s"], color="tab:red", linestyle=":", linewidth=1.0)
        failures.text(event["ran_at_s"], 1.0, f" {event['label']}", transform=failures.get_xaxis_transform(), va="top",
                      fontsize=7, color="tab:red")
    latency.legend(loc="upper right")
    failures.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary(result: dict[str, Any]) -> str:
    """The run in a few lines: per phase and overall, then each SLO check and the verdict."""
    lines = [f"{'phase':<14}{'offered/s':>10}{'achieved/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
             f"{'errors':>8}{'fallback':>9}{'dropped':>8}"]
    for name, s in [(p["name"], p) for p in result["phases"]] + [("overall", result["overall"])]:
        q = s["latency_ms"]
        lines.append(f"{name:<14}{s['offered_rate']:>10.1f}{s['achieved_rate']:>11.1f}{fmt(q['p50']):>9}{fmt(q['p90']):>9}"
                     f"{fmt(q['p99']):>9}{fmt(q['p99_9']):>10}{s['errors']:>8}{s['fallback_share']:>9.1%}"
                     f"{s['dropped_by_generator']:>8}")
    if result["overall"]["errors_by_code"]:
        lines.append("errors by code: " + ", ".join(f"{k} {v}" for k, v in result["overall"]["errors_by_code"].items()))
    generator, lag = result["generator"], result["generator"]["send_lag_ms"] or {"p50": None, "p99": None}
    lines.append(f"generator: {generator['processes']} processes, send lag behind schedule p50 {fmt(lag['p50'])} ms "
                 f"p99 {fmt(lag['p99'])} ms, dropped {generator['dropped']}")
    slo = result["slo"]
    lines += [f"SLO {c['name']}: {c['value']} (threshold {c['threshold']}) {'ok' if c['passed'] else 'FAILED'}"
              for c in slo["checks"]]
    lines.append(f"SLO verdict: {'PASS' if slo['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path, help="scenario YAML file (loadtests/scenarios/)")
    parser.add_argument("--target", help="grpc://HOST:PORT or http://HOST:PORT (default: the scenario's)")
    parser.add_argument("--admin", help="the gateway's admin listener for admin events, http://HOST:PORT (default: the scenario's)")
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (default: min(4, CPUs))")
    parser.add_argument("--out", type=Path, help="output directory (default: loadtests/out/NAME-TIMESTAMP)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    try:
        scenario = load_scenario(args.scenario)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    out = args.out or ROOT / "loadtests" / "out" / f"{scenario.name}-{started:%Y%m%d-%H%M%S}"
    try:
        with contextlib.ExitStack() as stack:
            backend = None
            if scenario.managed:
                if args.target:
                    raise SetupError("--target: a managed scenario starts its own gateway")
                (out / "managed").mkdir(parents=True, exist_ok=True)
                backend = Drill(out / "managed")
                stack.callback(backend.stop)
                try:
                    backend.start_triton()
                    backend.start_gateway()
                except (subprocess.CalledProcessError, RuntimeError) as e:
                    raise SetupError(f"cannot start the managed Triton and gateway: {e}") from None
                target = f"{scenario.protocol}://127.0.0.1:{backend.ports[scenario.protocol]}"
                admin = f"http://127.0.0.1:{backend.ports['admin']}"
            else:
                target, admin = args.target or scenario.target, args.admin or scenario.admin
            if target is None:
                raise SetupError("no target: pass --target or set 'target' in the scenario")
            if admin is None and any(e.action == "admin" for e in scenario.events):
                raise SetupError("admin events need the gateway's admin listener: pass --admin or set 'admin'")
            admin = admin and admin.rstrip("/")
            protocol, address = endpoint(target, scenario.protocol)
            print(f"{scenario.name}: {protocol}://{address}, {args.processes} processes, {scenario.duration_s:g} s",
                  file=sys.stderr, flush=True)
            collector, events = generate(scenario, protocol, address, admin, backend, args.processes, stack)
    except SetupError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    result = report(scenario, collector, events, f"{protocol}://{address}", args.processes, started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "latency.png")
    print(summary(result))
    print(f"results: {out / 'result.json'}, {out / 'latency.png'}")
    return 0 if result["slo"]["passed"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("loadgen: interrupted; stopped everything it started", file=sys.stderr)
        sys.exit(130)
