"""What collecting outcomes costs, in-process: `Recorder.remember` on the request path (header
segments read, one reference tuple queued), `Recorder.decode` in the store's writer thread (the
answer parsed, input segments banded), the SQLite writer's throughput, and a join of posted
outcomes. Prints a markdown table.

    .venv/bin/python bench/outcomes_cost.py
"""
from __future__ import annotations

import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import config  # noqa: E402
from gateway.outcomes.recorder import Answered, Recorder  # noqa: E402
from gateway.outcomes.records import Feedback  # noqa: E402
from gateway.outcomes.store import JoinStore  # noqa: E402
from gateway.protocol.wire import pb  # noqa: E402

SPEC = config.Outcomes.model_validate({
    "task": "classifier", "output": "probabilities", "business": {"converted": "rate"},
    "segments": {"region": {"header": "x-region", "values": ["eu", "us", "apac"]},
                 "band": {"input": "features", "index": 0, "bins": [-1.0, 0.0, 1.0]}}})
ROWS = 20_000


def best_us(stmt, number: int) -> float:
    """µs per call, best of 15 runs (the quietest: this is a shared, noisy machine's floor)."""
    return min(timeit.repeat(stmt, number=number, repeat=15)) / number * 1e6


def exchange(batch: int) -> tuple[pb.ModelInferRequest, bytes]:
    """A classifier request (8 features) and its answer (3 class probabilities), as the gateway holds them."""
    rng = np.random.default_rng(0)
    request = pb.ModelInferRequest(model_name="classifier", id="r")
    request.inputs.add(name="features", datatype="FP32", shape=[batch, 8])
    request.raw_input_contents.append(rng.standard_normal((batch, 8)).astype(np.float32).tobytes())
    answer = pb.ModelInferResponse(model_name="classifier", model_version="1")
    answer.outputs.add(name="probabilities", datatype="FP32", shape=[batch, 3])
    answer.raw_output_contents.append(rng.dirichlet(np.ones(3), batch).astype(np.float32).tobytes())
    return request, answer.SerializeToString()


def main() -> int:
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    headers = {"x-region": "eu", "content-type": "application/grpc"}
    with tempfile.TemporaryDirectory() as folder:
        store = JoinStore(f"sqlite:///{folder}/outcomes.db", queue_size=10 * ROWS, settle_s=0)
        recorder = Recorder("classifier", SPEC, SimpleNamespace(store=store))
        print("| what | where | cost |")
        print("|---|---|---:|")
        for batch in (1, 64):
            request, response = exchange(batch)
            remember = best_us(lambda: recorder.remember("r", "0" * 32, "v1", "1", "weight", headers, request, response),
                               2000)
            store.flush(60)
            answered = Answered(recorder, "r", "0" * 32, "v1", "1", "weight", {"region": "eu"}, request, response, 0.0)
            decode = best_us(lambda: recorder.decode(answered), 2000)
            print(f"| remember, batch {batch} | request path | {remember:.2f} µs |")
            print(f"| decode, batch {batch} | writer thread | {decode:.1f} µs |")
        request, response = exchange(1)
        start = time.perf_counter()
        for i in range(ROWS):
            recorder.remember(f"w{i}", "0" * 32, "v1", "1", "weight", headers, request, response)
        store.flush(120)
        elapsed = time.perf_counter() - start
        print(f"| {ROWS} predictions decoded and written (SQLite, WAL) | writer thread | "
              f"{ROWS / elapsed:,.0f} rows/s |")
        items = [Feedback("classifier", f"w{i}", label=float(i % 3), business={"converted": 1.0}) for i in range(1000)]
        start = time.perf_counter()
        report = store.join(items, time.time())
        per_item = (time.perf_counter() - start) / len(items) * 1e6
        assert report.counts()["joined"] == len(items)
        print(f"| join of 1,000 posted outcomes in one post | feedback call | {per_item:.0f} µs per outcome |")
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
