"""A tiny OpenAI-compatible completions server with engram-serve's CLI and metric names.

Why it exists: the load tester's client, metrics and comparison logic need fast,
deterministic targets (a known time per token, known token counts) that a real
model on a shared 2-core machine cannot give.  It takes engram-serve's flags so
``loadtest compare --server-cmd`` can start it per configuration; the Engram
flags change its per-token delay, which gives the comparison known ratios.

Run: python tests/loadtest/fake_server.py --port 8123 [--token-delay 0.005]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAYERS = ("1", "15")


def create_app(token_delay: float, engram: bool, model: str = "fake-model") -> FastAPI:
    app = FastAPI()
    reg = CollectorRegistry()
    prompt_tokens = Counter("engram_serve_prompt_tokens", "", ["model_name"], registry=reg)
    gen_tokens = Counter("engram_serve_generation_tokens", "", ["model_name"], registry=reg)
    step = Histogram("engram_serve_step_seconds", "", ["model_name"], registry=reg)
    if engram:
        lookups = Counter("engram_table_lookups", "", ["layer"], registry=reg)
        hits = Counter("engram_cache_hits", "", ["layer"], registry=reg)
        wait = Histogram("engram_prefetch_wait_seconds", "", ["layer"], registry=reg,
                         buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01))
        rows = Counter("engram_gather_rows", "", ["layer"], registry=reg)
        nbytes = Counter("engram_gather_bytes", "", ["layer"], registry=reg)
        touched = Gauge("engram_table_rows_touched_ratio", "", ["layer"], registry=reg)
        table_bytes = Gauge("engram_table_bytes", "", ["layer", "placement"], registry=reg)
        for layer in LAYERS:
            table_bytes.labels(layer, "host").set(1 << 20)
            touched.labels(layer).set(0.0)

    def account(n_prompt: int, n_out: int) -> None:
        """Metrics as a server with 2 Engram layers, 16 heads, 64-dim fp32 rows would
        report: one lookup per head per token, every other lookup a cache hit."""
        prompt_tokens.labels(model).inc(n_prompt)
        gen_tokens.labels(model).inc(n_out)
        for _ in range(n_out):
            step.labels(model).observe(token_delay)
        if engram:
            per_layer = 16 * (n_prompt + n_out)
            for layer in LAYERS:
                lookups.labels(layer).inc(per_layer)
                hits.labels(layer).inc(per_layer // 2)
                rows.labels(layer).inc(per_layer)
                nbytes.labels(layer).inc(per_layer * 256)
                touched.labels(layer).set(0.25)
                for _ in range(n_out):
                    wait.labels(layer).observe(0.0003)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n_out = int(body.get("max_tokens", 16))
        if n_out < 1:
            return JSONResponse({"error": {"message": "max_tokens must be >= 1", "type":
                                           "BadRequestError", "param": "max_tokens", "code": 400}},
                                status_code=400)
        cid = f"cmpl-{time.monotonic_ns()}"

        def frame(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            for i in range(n_out):
                await asyncio.sleep(token_delay)
                yield frame({"id": cid, "object": "text_completion", "model": model, "choices": [
                    {"index": 0, "text": f" t{i}",
                     "finish_reason": "length" if i == n_out - 1 else None}]})
            account(n_prompt, n_out)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                     "total_tokens": n_prompt + n_out}
            yield frame({"id": cid, "object": "text_completion", "model": model,
                         "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--token-delay", type=float, default=0.005)
    p.add_argument("--engram", default=None)
    p.add_argument("--no-engram", action="store_true")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--table-placement", default="host")
    p.add_argument("--table-dtype", default=None)
    p.add_argument("--cache-rows", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    args = p.parse_args()
    engram = bool(args.engram) and not args.no_engram
    # Known slow-downs so a comparison has ratios to check: no prefetch costs 2x.
    delay = args.token_delay * (2.0 if engram and args.no_prefetch else 1.0)
    uvicorn.run(create_app(delay, engram), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
