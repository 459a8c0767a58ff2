"""What the audit log costs per request, in-process: on the request path (`Auditor.infer`: build an
entry of references, append it to the queue) and in the writer thread (render with SHA-256 of
every tensor, chain, write, fsync and sign checkpoints), for a small and a large request. Prints a
markdown table; the end-to-end cost is a bench/run.py variant (`audit:drop`).

    .venv/bin/python bench/audit_cost.py
"""
from __future__ import annotations

import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.audit.trail import Auditor  # noqa: E402
from gateway.config import Audit  # noqa: E402
from gateway.dataplane import Call, Outcome  # noqa: E402
from gateway.observability.metrics import Metrics  # noqa: E402
from gateway.observability.trace import Trace  # noqa: E402
from gateway.protocol.wire import pb  # noqa: E402
from gateway.security.principal import Principal  # noqa: E402

METRICS = Metrics()
WRITER_RECORDS = 20000


def request(elements: int) -> tuple[Call, Outcome]:
    """A `double`-like request and answer with one FP32 tensor each of `elements` values."""
    values = np.arange(elements, dtype=np.float32).tobytes()
    req = pb.ModelInferRequest(model_name="double", id="bench-1")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, elements])
    req.raw_input_contents.append(values)
    answer = pb.ModelInferResponse(model_name="double", model_version="1", id="bench-1")
    answer.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, elements])
    answer.raw_output_contents.append(values)
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    call = Call("double", "", "bench-1", req.SerializeToString(), "grpc", "ipv4:127.0.0.1", headers, req,
                Trace.from_headers(headers), principal=Principal("spiffe://bench/client", "cert"))
    outcome = Outcome(model="double", target="primary", version="1", decision="weight", validation="passed",
                      response=answer.SerializeToString(), config_version="0123456789ab")
    return call, outcome


def request_path_us(directory: Path, call: Call, outcome: Outcome) -> float:
    """µs per Auditor.infer, best of 7 runs of 20000, the queue drained between runs."""
    auditor = Auditor(Audit(dir=str(directory / "path"), queue_size=10**6, max_queue_bytes=2**62), directory, "w0", METRICS)
    runs = []
    for _ in range(7):
        runs.append(timeit.timeit(lambda: auditor.infer(call, outcome, 0.001), number=20000) / 20000 * 1e6)
        auditor.log._queue.clear()
    return min(runs)


def writer_us(directory: Path, call: Call, outcome: Outcome, fsync_interval_s: float) -> float:
    """CPU µs per record the writer thread spends (render, chain, write, fsync, checkpoints): the
    process's CPU time while it drains a full queue, the main thread asleep."""
    auditor = Auditor(Audit(dir=str(directory / f"writer-{fsync_interval_s}"), queue_size=WRITER_RECORDS, max_queue_bytes=2**62,
                            fsync_interval_s=fsync_interval_s), directory, "w0", METRICS)
    for _ in range(WRITER_RECORDS):
        auditor.infer(call, outcome, 0.001)
    cpu = time.process_time()
    auditor.open()
    while auditor.log.depth:
        time.sleep(0.001)
    auditor.close(30.0)
    return (time.process_time() - cpu) / WRITER_RECORDS * 1e6


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for label, elements in (("64 B tensors", 16), ("64 KiB tensors", 16384)):
            call, outcome = request(elements)
            rows.append((label, request_path_us(directory, call, outcome), writer_us(directory, call, outcome, 1.0),
                         writer_us(directory, call, outcome, 0.01)))
    print(f"Python {platform.python_version()}, {platform.machine()}; writer: {WRITER_RECORDS} records per run\n")
    print("| request | request path (Auditor.infer) µs | writer CPU µs/record, fsync 1 s | writer CPU µs/record, fsync 10 ms |")
    print("|---|---|---|---|")
    for label, path, writer, eager in rows:
        print(f"| {label} | {path:.2f} | {writer:.1f} | {eager:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
