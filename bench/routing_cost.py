"""What routing costs per request, in-process: target decisions (weights, sticky hashing, pins,
blue-green), queuing a shadow, and comparing a shadow's answer. Appends a table to RESULTS.md.

    .venv/bin/python bench/routing_cost.py [--no-record]
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import timeit
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Backend, Compare, RoutingConfig  # noqa: E402
from gateway.dataplane import Call  # noqa: E402
from gateway.observability.metrics import Metrics  # noqa: E402
from gateway.observability.trace import Trace  # noqa: E402
from gateway.protocol.wire import pb  # noqa: E402
from gateway.routing.shadow import ShadowDispatcher, compare  # noqa: E402
from gateway.routing.table import compile_routes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class _Backend:
    name = "t"
    config = Backend(url="127.0.0.1:1")


def _route(**extra: object):
    targets = {"v1": {"backend": "t", "model": "classifier", "version": 1, "weight": 90},
               "v2": {"backend": "t", "model": "classifier", "version": 2, "weight": 10}}
    config = RoutingConfig.model_validate({"models": {"classifier": {"targets": targets, **extra}}})
    return compile_routes(config, {"t": _Backend()}, {}, {}).resolve("classifier")


def _answer(seed: int) -> bytes:
    answer = pb.ModelInferResponse(model_name="classifier", model_version="1")
    answer.outputs.add(name="probabilities", datatype="FP32", shape=[1, 3])
    answer.raw_output_contents.append(np.random.default_rng(seed).random((1, 3), np.float32).tobytes())
    return answer.SerializeToString()


def measure() -> list[tuple[str, float]]:
    """(what, µs per call), best of five runs."""
    def best(stmt, number: int = 20000) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6

    plain, sticky = _route(), _route(sticky={"header": "x-user"})
    pinned = _route(match=[{"header": "x-canary", "value": "yes", "target": "v2"}])
    active = _route(active="v2")
    headers, pin_headers = {"x-user": "user-123456"}, {"x-canary": "yes"}
    a, b = pb.ModelInferResponse.FromString(_answer(1)), pb.ModelInferResponse.FromString(_answer(2))
    rows = [
        ("decide: weighted draw", best(lambda: plain.decide("", {}, None))),
        ("decide: sticky rendezvous hash, 2 targets", best(lambda: sticky.decide("", headers, None))),
        ("decide: header pin", best(lambda: pinned.decide("", pin_headers, None))),
        ("decide: blue-green active", best(lambda: active.decide("", {}, None))),
        ("shadow compare (argmax + atol, 1x3 FP32)", best(lambda: compare(a, b, Compare(atol=1e-5, argmax=True)))),
    ]

    async def offers() -> float:
        shadowed = _route(shadows=[{"target": "v2", "rate": 1.0}])
        dispatcher = ShadowDispatcher(Metrics(), queue_size=10**7)
        call = Call("classifier", "", "", b"", "grpc", "bench", {}, pb.ModelInferRequest(), Trace.from_headers({}))
        target = shadowed.targets["v1"]
        n = 20000
        return min(timeit.repeat(lambda: dispatcher.offer(shadowed, call, target, b""), number=n, repeat=5)) / n * 1e6

    rows.append(("queue one shadow (offer, sampled in)", asyncio.run(offers())))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = measure()
    table = ["| per request | µs |", "|---|---|"] + [f"| {what} | {us:.2f} |" for what, us in rows]
    print("\n".join(table))
    if not args.no_record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/routing_cost.py", *sys.argv[1:]])
        with RESULTS.open("a") as out:
            out.write(f"\n## Routing cost, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, git {commit}\n\n"
                      f"`{command}` (in-process, best of 5 x 20000 calls)\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
