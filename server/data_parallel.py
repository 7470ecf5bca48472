"""`engram-serve --data-parallel-size N`: N engine processes behind one port on one host.

The parent process loads nothing: it starts N worker processes (`python -m server.cli` with the
same options and ENGRAM_SERVE_WORKER_RANK set), restarts one that dies, and forwards SIGTERM /
SIGINT to all of them (each drains as a lone server does). Each worker pins itself to its own
cores (os.sched_setaffinity, cores // N each, torch threads as many), maps the one shared copy of
the tables (placement shared) and serves on two sockets:

- the shared port, bound by every worker with SO_REUSEPORT: the kernel spreads new connections
  over the workers' accept queues, with no proxy hop on each streamed token. A worker joins it
  only once its engine is ready (a restarted one never answers 503 "loading" there) and leaves
  it first when it drains; a killed worker's queue goes with it, the others keep serving;
- its own port, `--port` + 1 + rank, from the start: /health, /metrics and the API of that
  worker alone. Prometheus scrapes each worker's port (the worker counts are per process, its
  metrics are those of its engine); a response on any port names its worker in `x-engram-worker`.

Why not one front process proxying to the engines: it would add a hop and a copy to every
token of a stream and be a single point of failure for a balancing the kernel does already.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from engram_runtime.engine_config import EngineConfig

from server.app import create_app
from server.config import ServerConfig
from server.engine_client import State
from server.runner import DrainingServer

WORKER_ENV = "ENGRAM_SERVE_WORKER_RANK"
WORKER_HEADER = b"x-engram-worker"
_PR_SET_PDEATHSIG = 1
logger = logging.getLogger("engram_serve")


def worker_rank() -> int | None:
    """This process's rank when it is a data-parallel worker, else None (the parent, or a lone server)."""
    rank = os.environ.get(WORKER_ENV)
    return None if rank is None else int(rank)


def worker_port(port: int, rank: int) -> int:
    return port + 1 + rank


def core_sets(size: int, cpus: list[int] | None = None) -> list[list[int] | None]:
    """Disjoint core sets, cores // size each (None for all when there are fewer cores than workers)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    per = len(cpus) // size
    return [cpus[r * per:(r + 1) * per] if per else None for r in range(size)]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no worker outlives it (they
    run in their own sessions, so a terminal's Ctrl-C reaches the supervisor alone)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    ready: bool = False


@dataclass
class Supervisor:
    """Starts and keeps N workers; `run()` blocks until they have all stopped."""

    size: int
    argv: list[str]                  # the workers' command-line options
    server: ServerConfig
    restart_delay: float = 1.0
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False

    def _spawn(self, rank: int) -> Worker:
        env = {**os.environ, WORKER_ENV: str(rank)}
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", *self.argv], env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        logger.info("engine worker %d started (pid %d, own port %d)", rank, proc.pid,
                    worker_port(self.server.port, rank))
        return Worker(rank, proc)

    def _forward(self, sig, frame) -> None:
        self.stopping = True
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(sig)

    def _healthy(self, worker: Worker) -> bool:
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "") else self.server.host
        url = f"http://{host}:{worker_port(self.server.port, worker.rank)}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        self.workers = [self._spawn(rank) for rank in range(self.size)]
        while not self.stopping:
            time.sleep(0.5)
            for i, w in enumerate(self.workers):
                rc = w.proc.poll()
                if rc is None:
                    w.ready = w.ready or self._healthy(w)
                    continue
                if self.stopping:
                    break
                if not w.ready and rc in (1, 2):  # it could not load: neither would a new one
                    logger.error("engine worker %d exited with code %d before it was ready; stopping", w.rank, rc)
                    self._forward(signal.SIGTERM, None)
                    break
                logger.warning("engine worker %d (pid %d) exited with code %d; restarting it", w.rank, w.proc.pid, rc)
                time.sleep(self.restart_delay)
                self.workers[i] = self._spawn(w.rank)
        codes = [w.proc.wait() for w in self.workers]
        return max((c for c in codes if c > 0), default=0)


class WorkerHeader:
    """ASGI wrapper naming the worker in every HTTP response (x-engram-worker: its data-parallel
    rank, or a Ray Serve replica's tag)."""

    def __init__(self, app, rank: int | str):
        self.app, self.rank = app, str(rank).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (WORKER_HEADER, self.rank)]}
            await send(message)

        return await self.app(scope, receive, tagged)


def reuse_port_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class WorkerServer(DrainingServer):
    """A worker's uvicorn: its own port from the start, the shared port once the engine is ready."""

    def __init__(self, config, client, shutdown_timeout: float, shared: socket.socket):
        super().__init__(config, client, shutdown_timeout)
        self._shared_socket = shared
        self._shared_server: asyncio.base_events.Server | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        asyncio.get_running_loop().create_task(self._join_when_ready())

    async def _join_when_ready(self) -> None:
        while self._client.state is State.LOADING:
            await asyncio.sleep(0.1)
        if self._client.state is not State.READY or self.should_exit:
            return
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        self._shared_server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._shared_socket, backlog=self.config.backlog)
        self.servers.append(self._shared_server)
        logger.info("engine ready: serving the shared port %d", self._shared_socket.getsockname()[1])

    async def _drain(self) -> None:
        if self._shared_server is not None:  # new connections go to the workers still serving
            self._shared_server.close()
        await super()._drain()


def serve_worker(engine_config: EngineConfig, server_config: ServerConfig, rank: int) -> int:
    """One data-parallel worker (the cores and threads are set by the caller); blocks until it stops."""
    import uvicorn

    own = reuse_port_socket(server_config.host, worker_port(server_config.port, rank), reuse_port=False)
    shared = reuse_port_socket(server_config.host, server_config.port, reuse_port=True)
    app = create_app(engine_config, server_config)
    config = uvicorn.Config(WorkerHeader(app, rank), log_level=server_config.log_level, timeout_graceful_shutdown=5,
                            access_log=server_config.log_level == "debug")
    server = WorkerServer(config, app.state.client, server_config.shutdown_timeout, shared)
    app.state.on_load_failure = server.fail
    server.run(sockets=[own])
    return server.exit_code
