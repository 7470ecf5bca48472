"""engram-serve replicas on Ray Serve: `serve run deploy/serve.yaml` (docs/scaleout.md, "Ray Serve").

Each replica is one engine behind the very app `engram-serve` runs (server.app.create_app, so the
OpenAI routes, streaming, errors and /metrics are the same code), built inside the replica with
`@serve.ingress()` and `__serve_build_asgi_app__`. The application's `args` are engram-serve's
own command-line options, parsed and checked by server.cli at deploy time, so a typo fails the
deploy instead of every replica. Replica count, autoscaling and CPUs come from the Serve config.

- Tables: placement `shared` unless the options say otherwise, so the replicas on one node map
  that node's one copy in /dev/shm (offload/shared.py); the first replica there writes it.
- Readiness: a replica is ready (Ray routes to it) only once its engine has loaded, so no
  client sees 503 "loading" from a starting replica; a failed load fails the constructor and
  Ray retries it. `check_health` is server.health's readiness, so a lost table or a stuck
  engine makes Ray replace the replica, while a draining one is left to finish.
- Replica identity: every response names its replica (Ray's replica tag) in `x-engram-worker`,
  the header `--data-parallel-size` workers set with their rank.
- Metrics: server/ray_metrics.py mirrors the replica's registry into Ray's metrics export.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve

from offload.shared import DIR_ENV as SHARED_DIR_ENV
from server import cli
from server.app import create_app
from server.data_parallel import WorkerHeader
from server.engine_client import State
from server.health import readiness
from server.ray_metrics import RegistryMirror

logger = logging.getLogger("engram_serve")


def parse_options(options: list[str]) -> argparse.Namespace:
    """engram-serve's options for one replica, checked as the command checks them; placement
    shared by default, since replicas on a node share its table copy."""
    parser = cli.build_parser()
    args = parser.parse_args(options)
    cli._check(args, parser)
    if args.data_parallel_size != 1:
        parser.error("--data-parallel-size: on Ray Serve each replica is one engine; set num_replicas instead")
    if args.table_placement is None:
        args.table_placement = "shared"
    return args


def _replica_threads(threads: int | None) -> int:
    """The replica's own CPUs (its ray_actor_options num_cpus), not the node's: replicas on a
    node would otherwise each start a thread per core and stall one another."""
    if threads is not None:
        return threads
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _serve_when_loaded(app: FastAPI, mirror: RegistryMirror) -> None:
    """Holds the app's lifespan startup (and so the replica's start) until the engine has loaded,
    then starts the metrics mirror; a failed load fails the replica's start."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with inner(app) as state:
            client = app.state.client
            while client.state is State.LOADING:
                await asyncio.sleep(0.1)
            if client.state is State.FAILED:
                raise RuntimeError(f"the engine failed to load: {client.load_error}")
            publish = asyncio.create_task(mirror.run(client.metrics.registry))
            try:
                yield state
            finally:
                publish.cancel()

    app.router.lifespan_context = lifespan


@serve.deployment(name="engram", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  health_check_period_s=10, graceful_shutdown_timeout_s=30)
@serve.ingress()
class EngramReplica:
    """One engine and its app; the Serve config overrides the defaults above."""

    def __init__(self, options: list[str]):
        args = parse_options(options)
        if args.shared_table_dir is not None:  # read where the tables open, as `engram-serve` does
            os.environ[SHARED_DIR_ENV] = args.shared_table_dir
        torch.set_num_threads(_replica_threads(args.threads))
        self._engine_config, self._server_config = cli.configs(args)
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._app = create_app(self._engine_config, self._server_config)
        self._app.add_middleware(WorkerHeader, rank=serve.get_replica_context().replica_tag)
        _serve_when_loaded(self._app, RegistryMirror())
        return self._app

    def check_health(self) -> None:
        """Ray replaces a replica whose engine cannot serve (a failed load, a lost table, a stuck
        step); loading and draining are states to wait out, not failures."""
        ready = readiness(self._app.state.client)
        if ready.status in ("failed", "unhealthy"):
            raise RuntimeError(f"engine {ready.status}: {ready.reason}")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application builder (`import_path: server.ray_serve:build_app`); `args` holds
    `options`, a list of engram-serve command-line options every replica starts with."""
    options = [str(o) for o in args.get("options", [])]
    parse_options(options)  # fail the deploy, not every replica, on a bad option
    return EngramReplica.bind(options)
