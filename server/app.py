"""The FastAPI application: routes, auth, lifespan (engine load in the background), metrics.

The app listens before the model is loaded so orchestrators can watch /health (503 while
loading, draining or unable to serve, 200 when ready; server/health.py); generation routes
answer 503 meanwhile. Every response carries the request's X-Request-Id (server/request_id.py).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engram_runtime.engine_config import EngineConfig

from server import health
from server.chat import create_chat_completion
from server.completions import create_completion
from server.config import ServerConfig
from server.engine_client import EngineClient
from server.errors import APIError, error_response, install_error_handlers
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.request_id import RequestIdMiddleware

logger = logging.getLogger("engram_serve")


def package_version() -> str:
    try:
        return version("engram-serve")
    except PackageNotFoundError:
        return "0.1.0+source"


def _auth(api_key: str | None):
    """Dependency for /v1: a bearer token compared in constant time."""
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided; pass it as `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check


def _client(request: Request) -> EngineClient:
    return request.app.state.client


def _api_router(server_config: ServerConfig) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(server_config.api_key))])

    @router.get("/models", response_model=ModelList)
    async def models(request: Request):
        client = _client(request)
        engine = client.check_available()
        root = client.engine_config.model or engine.model_name
        return ModelList(data=[ModelCard(id=client.model_name, root=str(root), max_model_len=engine.max_model_len,
                                         engram_layers=list(engine.engram_layer_ids))])

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(body, request, _client(request))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(body, request, _client(request))

    return router


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/version")
    async def version_info(request: Request):
        client = _client(request)
        engine = client.engine
        serving = {"device": None, "dtype": None, "max_num_seqs": None, "cuda_graphs": None, "engram_layers": None,
                   "quantization": None}
        if engine is not None:
            serving = {"device": str(engine.device.torch_device), "dtype": engine.dtype,
                       "max_num_seqs": engine.max_num_seqs, "cuda_graphs": engine.graphs is not None,
                       "engram_layers": list(engine.engram_layer_ids), "quantization": engine.quantization}
        return {"version": package_version(), "model": client.model_name, **serving,
                "engram_checkpoint": client.engine_config.engram}

    @router.get("/metrics")
    async def metrics(request: Request):
        client = _client(request)
        if client.metrics is None:
            return error_response(APIError(503, "metrics are available once the model is loaded", code="loading"))
        return Response(generate_latest(client.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _include_dashboard(app: FastAPI) -> None:
    """The live page (server/dashboard.py, owned by observability) when it is present."""
    if importlib.util.find_spec("server.dashboard") is None:
        return
    from server import dashboard
    app.include_router(dashboard.router)


def create_app(engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    """The app; the engine is built when the app starts (lifespan), not here."""
    client = EngineClient(engine_config, server_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load = asyncio.create_task(client.load())
        load.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or app.state.on_load_failure(t.exception()))
        try:
            yield
        finally:
            if not load.done():
                load.cancel()
            await asyncio.to_thread(client.shutdown)

    app = FastAPI(title="engram-serve", version=package_version(), lifespan=lifespan,
                  description="OpenAI-compatible inference server for models with DeepSeek Engram memory.")
    app.state.client = client
    app.state.on_load_failure = lambda exc: None  # the CLI's runner replaces this to exit the process
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(_api_router(server_config))
    app.include_router(health.router)
    app.include_router(_ops_router())
    _include_dashboard(app)
    return app
