"""Shared fixtures: a real Triton on CPU (started by the project's own script) and gateways
started as real processes (`python -m gateway serve`) on free ports."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import pytest
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
TRITON_SCRIPT = ROOT / "scripts" / "triton-cpu.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_app(application: web.Application) -> tuple[web.AppRunner, str]:
    """A real HTTP server for application on a free local port: its runner (cleanup() stops it)
    and its base URL."""
    runner = web.AppRunner(application)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def serve_hook(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    """A real local webhook receiver answering POST /hook with handler: its runner and URL."""
    application = web.Application()
    application.router.add_post("/hook", handler)
    runner, base = await serve_app(application)
    return runner, base + "/hook"


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Endpoints:
    """host:port strings for a server's gRPC and HTTP listeners on loopback."""

    http_port: int
    grpc_port: int

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"


def metric(gw: "Gateway", name: str, **labels: str) -> float:
    """The sum of a metric's samples on the gateway's /metrics that carry these labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics").read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Triton(Endpoints):
    http_port: int
    grpc_port: int
    metrics_port: int


@pytest.fixture(scope="session")
def triton() -> Iterator[Triton]:
    """A real Triton Inference Server on CPU with the example models, on free ports."""
    t = Triton(free_port(), free_port(), free_port())
    env = dict(os.environ, TRITON_HTTP_PORT=str(t.http_port), TRITON_GRPC_PORT=str(t.grpc_port),
               TRITON_METRICS_PORT=str(t.metrics_port))
    subprocess.run([str(TRITON_SCRIPT), "start"], env=env, check=True, timeout=600)
    try:
        yield t
    finally:
        subprocess.run([str(TRITON_SCRIPT), "stop"], env=env, check=False, timeout=60)


@dataclass
class OwnTriton(Triton):
    """A Triton a test may kill, stop and restart."""

    env: dict
    args: tuple[str, ...] = ()   # extra tritonserver flags (TLS, ...)

    @property
    def pid(self) -> int:
        home = Path(os.environ.get("TRITON_HOME", ROOT / ".triton"))
        return int((home / f"tritonserver-{self.http_port}.pid").read_text())

    def start(self) -> None:
        subprocess.run([str(TRITON_SCRIPT), "start", *self.args], env=self.env, check=True, timeout=120)


class TritonSpawner:
    """Starts Tritons of a test's (or a module's) own, on free ports, with extra tritonserver flags
    and optionally a model repository of their own (models); stop_all() at teardown."""

    def __init__(self) -> None:
        self.started: list[OwnTriton] = []

    def __call__(self, *args: str, models: Path | None = None) -> OwnTriton:
        ports = free_port(), free_port(), free_port()
        env = dict(os.environ, TRITON_HTTP_PORT=str(ports[0]), TRITON_GRPC_PORT=str(ports[1]), TRITON_METRICS_PORT=str(ports[2]))
        if models is not None:
            env["TRITON_MODELS"] = str(models)
        t = OwnTriton(*ports, env=env, args=args)
        t.start()
        self.started.append(t)
        return t

    def stop_all(self) -> None:
        for t in self.started:
            subprocess.run([str(TRITON_SCRIPT), "stop"], env=t.env, check=False, timeout=60)


@pytest.fixture
def spawn_triton() -> Iterator[Callable[..., OwnTriton]]:
    """Tritons of the test's own (TritonSpawner), stopped at teardown."""
    spawner = TritonSpawner()
    yield spawner
    spawner.stop_all()


@pytest.fixture(scope="module")
def module_spawn_triton() -> Iterator[Callable[..., OwnTriton]]:
    """Tritons shared by a module's tests (TritonSpawner), stopped after the module."""
    spawner = TritonSpawner()
    yield spawner
    spawner.stop_all()


@dataclass
class Gateway(Endpoints):
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    admin_port: int
    config_path: Path

    def wait_workers(self, count: int, timeout: float = 15.0) -> None:
        """The readiness wait saw one worker answer; wait until `count` workers are serving."""
        log = self.config_path.parent / "gateway.log"
        deadline = time.monotonic() + timeout
        while log.read_text().count("serving:") < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} workers serving after {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


# Anyone may do anything: tests of other rooms use the admin API without credentials.
ADMIN_OPEN = [{"name": "tests", "anonymous": True, "actions": ["infer", "metadata", "admin"]}]
DEFAULT_ROUTES = {
    "double": {"target": {"backend": "triton", "model": "double"}},
    "classifier": {"target": {"backend": "triton", "model": "classifier", "version": 2}},
    "classifier-v1": {"target": {"backend": "triton", "model": "classifier", "version": 1}},
    "slow": {"target": {"backend": "triton", "model": "slow"}},
}

class Launcher:
    """Starts `infergate serve` processes with generated configs and stops them all on close()."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Gateway] = []

    def start(self, backend_url: str, routes: dict | None = None, wait_ready: bool = True,
              access: list | None = ADMIN_OPEN, **overrides: object) -> Gateway:
        """access: the routing file's access rules (default: anyone may do anything, admin included)."""
        http, grpc_, admin = free_port(), free_port(), free_port()
        backend = {"url": backend_url, **overrides.pop("backend", {})}  # type: ignore[dict-item]
        config = {
            "listeners": {"http": {"host": "127.0.0.1", "port": http}, "grpc": {"host": "127.0.0.1", "port": grpc_},
                          "admin": {"host": "127.0.0.1", "port": admin}},
            "backends": {"triton": backend},
            "routing_file": "routing.yaml",
            **overrides,
        }
        directory = self.directory / f"gw{len(self.started)}"
        directory.mkdir(parents=True)
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        routing = {"models": routes or DEFAULT_ROUTES, **({"access": access} if access is not None else {})}
        (directory / "routing.yaml").write_text(yaml.safe_dump(routing))
        with open(directory / "gateway.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(directory / "gateway.yaml")],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        gw = Gateway(proc, http, grpc_, admin, directory / "gateway.yaml")
        self.started.append(gw)
        wait_http(f"http://127.0.0.1:{admin}/{'ready' if wait_ready else 'live'}", proc=proc)
        return gw

    def close(self) -> None:
        """Kill every gateway's whole process group (a supervisor and its workers)."""
        for gw in self.started:
            try:
                os.killpg(gw.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            gw.proc.wait(10)


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways for one test; all are killed at teardown if still running."""
    launcher = Launcher(tmp_path)
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """A launcher whose gateways live for a whole test module."""
    launcher = Launcher(tmp_path_factory.mktemp("gateways"))
    yield launcher
    launcher.close()


REDIS_SCRIPT = ROOT / "scripts" / "redis.sh"


@dataclass
class Redis:
    """A real Redis server (scripts/redis.sh) a test may stop and start again on the same port."""

    port: int
    env: dict

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run([str(REDIS_SCRIPT), "start"], env=self.env, check=True, timeout=300)

    def stop(self) -> None:
        subprocess.run([str(REDIS_SCRIPT), "stop"], env=self.env, check=False, timeout=60)


def running(server: "Redis | Postgres") -> Iterator["Redis | Postgres"]:
    """A fixture's body for a service the test owns: started, yielded, stopped whatever happens."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A Redis of the test's own on a free port (installed from Debian's package if missing)."""
    port = free_port()
    yield from running(Redis(port, dict(os.environ, REDIS_PORT=str(port), REDIS_HOME=str(tmp_path / "redis"))))


POSTGRES_SCRIPT = ROOT / "scripts" / "postgres.sh"


@dataclass
class Postgres:
    """A real PostgreSQL server (scripts/postgres.sh, a private cluster) a test may stop and start
    again on the same port; its data survives a restart."""

    port: int
    env: dict
    args: tuple[str, ...] = ("-c", "fsync=off")   # tests need no durability across a machine crash

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/infergate"

    def start(self) -> None:
        subprocess.run([str(POSTGRES_SCRIPT), "start", *self.args], env=self.env, check=True, timeout=300)

    def stop(self) -> None:
        subprocess.run([str(POSTGRES_SCRIPT), "stop"], env=self.env, check=False, timeout=60)


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[Postgres]:
    """A PostgreSQL of the test's own on a free port, its cluster under tmp_path (installed from
    Debian's package if missing), with an empty database `infergate`."""
    port = free_port()
    yield from running(Postgres(port, dict(os.environ, PG_PORT=str(port), PGHOME=str(tmp_path / "postgres"))))
