"""Runs N worker processes sharing the listening ports (SO_REUSEPORT) and forwards stop signals.

Workers are fresh interpreters (not forks): gRPC's core does not survive fork. A worker that dies
on its own is restarted after a second; SIGTERM/SIGINT go to every worker, which drain and exit;
SIGHUP goes to every worker, which reload the routing file. Worker 0 is the leader that runs
the rollout controller.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
LEADER_ENV = "INFERGATE_LEADER"  # "1" in the one worker that runs the rollout controller
WORKER_ENV = "INFERGATE_WORKER"  # the worker's index: a restarted worker takes over its audit stream


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM (a drain) if the supervisor dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(argv: list[str], workers: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="infergate-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    command = [sys.executable, "-m", "gateway", *argv, "--worker"]
    stopping = False

    def spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=dict(env, **{LEADER_ENV: "1" if index == 0 else "0", WORKER_ENV: str(index)}),
                                preexec_fn=_die_with_parent)

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        forward(signum, frame)

    procs = [spawn(i) for i in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)
    log.info("supervising %d workers: %s", workers, " ".join(str(p.pid) for p in procs))
    try:
        while True:
            alive = 0
            for i, p in enumerate(procs):
                if p.poll() is None:
                    alive += 1
                elif not stopping:
                    log.warning("worker %d exited with %s; restarting", p.pid, p.returncode)
                    time.sleep(1.0)
                    procs[i] = spawn(i)
                    alive += 1
            if stopping and alive == 0:
                break
            time.sleep(0.2)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((p.returncode or 0) for p in procs)
