"""A backend with two real Triton replicas: one killed under load, and a retry budget that caps
the extra load a failing replica causes."""
from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

from tests.conftest import metric

DOUBLE = {"double": {"target": {"backend": "triton", "model": "double"}}}


async def run_load(url: str, seconds: float, concurrency: int = 4, on_half=None) -> tuple[int, list[str]]:
    """Send requests for `seconds`; (answers, error codes). on_half() runs halfway through."""
    client = grpc_aio.InferenceServerClient(url)
    tensor = grpc_aio.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    ok, errors = 0, []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal ok
        while loop.time() < end:
            try:
                await client.infer("double", [tensor])
                ok += 1
            except InferenceServerException as e:
                errors.append(e.status())

    async def trigger() -> None:
        await asyncio.sleep(seconds / 2)
        on_half()

    await asyncio.gather(*(worker() for _ in range(concurrency)), *([trigger()] if on_half else []))
    await client.close()
    return ok, errors


async def test_one_replica_killed_under_load_moves_traffic_to_the_other(spawn_triton, start_gateway):
    a, b = spawn_triton(), spawn_triton()
    gw = start_gateway("", routes=DOUBLE, backend={"url": None, "urls": [a.grpc_url, b.grpc_url], "health_interval_s": 0.5})
    ok, errors = await run_load(gw.grpc_url, 4.0, on_half=lambda: os.kill(a.pid, signal.SIGKILL))
    assert ok > 200
    assert len(errors) <= 4, errors  # at most the requests in flight on the dead replica (retries save most)
    ok_after, errors_after = await run_load(gw.grpc_url, 1.0)
    assert ok_after > 50 and errors_after == []


async def test_retries_stay_within_the_budget(spawn_triton, start_gateway):
    a, b = spawn_triton(), spawn_triton()
    # health probes and ejection effectively off: the dead replica stays in rotation
    gw = start_gateway("", routes=DOUBLE, backend={"url": None, "urls": [a.grpc_url, b.grpc_url], "health_interval_s": 3600,
                                                   "eject_after": 100000, "retry_budget": 0.1, "retries": 1})
    os.kill(b.pid, signal.SIGKILL)
    ok, errors = await run_load(gw.grpc_url, 3.0, concurrency=2)
    requests = ok + len(errors)
    sent = metric(gw, "infergate_backend_retries_total", backend="triton", result="sent")
    refused = metric(gw, "infergate_backend_retries_total", backend="triton", result="over_budget")
    assert sent <= 0.1 * requests + 10 + 1, (sent, requests)   # the budget: 10% plus the reserve
    assert sent >= 0.1 * requests - 5                          # and it is used
    assert len(errors) == refused and set(errors) == {"StatusCode.UNAVAILABLE"}
