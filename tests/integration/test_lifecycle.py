"""Process lifecycle: SIGTERM drains in-flight requests; several workers share the ports."""
from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import metric

DELAY_MS = 800.0


def _slow_http(url: str) -> float:
    tensor = httpclient.InferInput("DELAY_MS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[DELAY_MS]], np.float32))
    return float(httpclient.InferenceServerClient(url).infer("slow", [tensor]).as_numpy("OUTPUT0")[0, 0])


async def test_sigterm_lets_in_flight_requests_finish(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, drain_timeout_s=10)
    client = grpc_aio.InferenceServerClient(gw.grpc_url)

    async def slow_grpc() -> float:
        tensor = grpc_aio.InferInput("DELAY_MS", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[DELAY_MS]], np.float32))
        return float((await client.infer("slow", [tensor])).as_numpy("OUTPUT0")[0, 0])

    async def fast_grpc(i: int) -> float:
        tensor = grpc_aio.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
        return float((await client.infer("double", [tensor])).as_numpy("OUTPUT0")[0, 0])

    # steady load first, then slow requests that are in flight when SIGTERM lands
    fast = await asyncio.gather(*(fast_grpc(i) for i in range(200)))
    assert fast == [2.0 * i for i in range(200)]
    pool = ThreadPoolExecutor(4)
    loop = asyncio.get_running_loop()
    in_flight = [asyncio.create_task(slow_grpc()) for _ in range(8)]
    in_flight += [loop.run_in_executor(pool, _slow_http, gw.http_url) for _ in range(4)]
    await asyncio.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    answers = await asyncio.gather(*in_flight)
    assert answers == [DELAY_MS] * 12
    assert await loop.run_in_executor(None, gw.proc.wait, 15) == 0
    await client.close()
    pool.shutdown()


async def test_new_requests_after_sigterm_are_refused_not_hung(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, drain_timeout_s=5)
    client = grpc_aio.InferenceServerClient(gw.grpc_url)
    tensor = grpc_aio.InferInput("DELAY_MS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1000.0]], np.float32))
    holder = asyncio.create_task(client.infer("slow", [tensor]))
    await asyncio.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        await client.infer("slow", [tensor], client_timeout=5)
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert time.monotonic() - start < 2
    await holder
    await client.close()


def test_workers_share_ports_and_metrics(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, workers=2)
    gw.wait_workers(2)
    workers = psutil.Process(gw.proc.pid).children()
    assert len(workers) == 2
    clients = []
    for i in range(20):  # a new connection each, kept open: the kernel spreads them over workers
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
        clients.append(httpclient.InferenceServerClient(gw.http_url))
        assert clients[-1].infer("double", [tensor]).as_numpy("OUTPUT0")[0, 0] == 2 * i
    accepted = [sum(1 for c in w.net_connections() if c.laddr and c.laddr.port == gw.http_port and c.status == "ESTABLISHED")
                for w in workers]
    assert all(n > 0 for n in accepted) and sum(accepted) == 20, accepted  # both workers accepted connections
    for client in clients:
        client.close()
    # every worker's count, whichever worker answered the scrape
    assert metric(gw, "infergate_requests_total", code="OK", model="double", protocol="http") == 20
    assert gw.stop() == 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_workers_exit_when_the_supervisor_is_killed(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, workers=2)
    workers = psutil.Process(gw.proc.pid).children()
    assert len(workers) == 2
    gw.proc.kill()  # SIGKILL: the supervisor cannot forward anything
    gw.proc.wait(5)
    _, alive = psutil.wait_procs(workers, timeout=15)  # each got SIGTERM from the kernel
    assert alive == []
