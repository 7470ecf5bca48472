"""One load-test run: send a workload on its schedule, collect timings, summarise.

Requests are launched at their scheduled offsets from one start instant (absolute
times, so event-loop lag never accumulates into a lower rate); with
``max_concurrency`` a request that arrives while the limit is reached waits for a
slot, like vLLM's benchmark. ``/metrics`` is scraped after the warm-up and after
the last request, so the Engram figures cover the measured part only.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
import numpy as np
from tqdm.asyncio import tqdm

from loadtest.client import RequestResult, RequestSettings, send_request
from loadtest.metrics import summarize
from loadtest.scrape import engram_figures, fetch_metrics, server_token_counts
from loadtest.workload import SampleRequest, WorkloadConfig, arrival_offsets, build_requests


class TargetError(RuntimeError):
    """The target server cannot be used at all (unreachable, no model)."""


@dataclass
class RunConfig:
    base_url: str
    model: str | None = None  # None: the first model of GET /v1/models
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    endpoint: str = "/v1/completions"
    timeout: float = 600.0
    warmup_requests: int = 0
    seed: int = 0
    progress: bool = True
    scrape: bool = True
    extra_body: dict = field(default_factory=dict)  # added to every request body (RequestSettings)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


async def discover_model(client: httpx.AsyncClient, cfg: RunConfig) -> str:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        resp = await client.get(cfg.base_url + "/v1/models", headers=headers, timeout=30.0)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise TargetError(
            f"cannot list models at {cfg.base_url}/v1/models ({type(exc).__name__}: {exc}); "
            "is the server up? pass --model to skip discovery"
        ) from None


def warmup_requests(requests: list[SampleRequest], n: int, seed: int) -> list[SampleRequest]:
    """Random-token requests shaped like the workload's (median lengths): they warm the
    server's code paths and batch shapes, but not its Engram row cache with the very
    N-grams about to be measured, which would flatter a cached configuration."""
    in_len = int(np.median([r.prompt_len or len(str(r.prompt).split()) for r in requests]))
    out_len = int(np.median([r.output_len for r in requests]))
    return build_requests(WorkloadConfig(num_prompts=n, input_len=max(1, in_len),
                                         output_len=max(1, out_len), seed=seed + 1_000_003))


async def _send_all(
    client: httpx.AsyncClient,
    cfg: RunConfig,
    settings: RequestSettings,
    requests: list[SampleRequest],
    offsets,
    bar,
) -> list[RequestResult]:
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def one(req: SampleRequest) -> RequestResult:
        if slots is None:
            res = await send_request(client, cfg.base_url, req, settings)
        else:
            async with slots:
                res = await send_request(client, cfg.base_url, req, settings)
        if bar is not None:
            bar.update(1)
        return res

    start = time.perf_counter()
    tasks = []
    for req, offset in zip(requests, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    return list(await asyncio.gather(*tasks))


async def run_async(cfg: RunConfig, requests: list[SampleRequest]) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = cfg.model or await discover_model(client, cfg)
        settings = RequestSettings(
            model=model, temperature=cfg.temperature, ignore_eos=cfg.ignore_eos,
            api_key=cfg.api_key, endpoint=cfg.endpoint, extra_body=dict(cfg.extra_body),
        )
        if cfg.warmup_requests:
            warm = warmup_requests(requests, cfg.warmup_requests, cfg.seed)
            await _send_all(client, cfg, settings, warm, [0.0] * len(warm), None)
        before = await fetch_metrics(client, cfg.base_url) if cfg.scrape else None
        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        bar = tqdm(total=len(requests), disable=not cfg.progress, desc="requests")
        t0 = time.perf_counter()
        results = await _send_all(client, cfg, settings, requests, offsets, bar)
        duration = time.perf_counter() - t0
        bar.close()
        after = await fetch_metrics(client, cfg.base_url) if before is not None else None

    result: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "base_url": cfg.base_url,
        "model_id": model,
        "num_prompts": len(requests),
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "temperature": cfg.temperature,
        "ignore_eos": cfg.ignore_eos,
        "warmup_requests": cfg.warmup_requests,
    }
    result.update(summarize(results, duration))
    if before is not None and after is not None:
        result["server_tokens"] = server_token_counts(before, after)
        engram = engram_figures(before, after, duration)
        if engram:
            result["engram"] = engram
    result.update({
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "start_times": [r.start - t0 for r in results],
        "scheduled_times": [float(x) for x in offsets],
        "errors": [r.error for r in results],
    })
    return result


def run(cfg: RunConfig, requests: list[SampleRequest]) -> dict:
    return asyncio.run(run_async(cfg, requests))
