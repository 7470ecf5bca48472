"""Readiness (`/health`) and liveness (`/live`): what an orchestrator asks each replica.

Kubernetes (and a load balancer, or a Ray Serve deployment's check_health) routes traffic by
readiness and restarts by liveness, so the two must not be mixed up. `/health` is vLLM's
route and means "send me requests": 200 `{"status": "ready"}` only while the engine can
serve, else 503 with the status and a `reason` in words (never a server path, since the
route needs no key). Besides loading, draining and a failed load, the engine turns unready
when it cannot serve: a lost or unreadable table, a dead worker (LLMEngine.check_health),
or no step finished for `engine_iteration_timeout` seconds while sequences wait. `/live`
answers 200 whenever the event loop does: restarting a replica that is loading or draining
would only make things worse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.engine_client import EngineClient, State


@dataclass(frozen=True)
class Readiness:
    status: str  # "ready", "loading", "draining", "failed" or "unhealthy"
    reason: str | None = None  # why it is not ready, for people and logs


def readiness(client: EngineClient) -> Readiness:
    """Whether the replica can take requests now, and if not, why."""
    if client.state is not State.READY:
        return Readiness(client.state.value, client.unavailable_message())
    problem = client.engine.check_health() or _stuck_step(client)
    return Readiness("ready") if problem is None else Readiness("unhealthy", problem)


def _stuck_step(client: EngineClient) -> str | None:
    """No step finished for the configured timeout while sequences wait: the engine is stuck."""
    waiting = client.sequences_in_engine()
    idle_for = time.monotonic() - client.last_progress
    timeout = client.server_config.engine_iteration_timeout
    if waiting and idle_for > timeout:
        return (f"no engine step has finished for {idle_for:.0f} s while {waiting} sequences wait "
                f"(engine_iteration_timeout {timeout:g} s)")
    return None


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ready = readiness(request.app.state.client)
    body = {"status": ready.status} if ready.reason is None else {"status": ready.status, "reason": ready.reason}
    return JSONResponse(body, status_code=200 if ready.status == "ready" else 503)


@router.get("/live")
async def live() -> dict:
    return {"status": "alive"}
