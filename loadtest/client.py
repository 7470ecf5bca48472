"""One streaming request to an OpenAI-compatible ``/v1/completions`` endpoint.

Timing follows vLLM's benchmark client: TTFT is the time to the first chunk that
carries a choice (its text may be empty, e.g. for a special token), every later
such chunk adds one inter-token latency (the usage-only chunk, with no choices,
does not), E2E latency ends at ``[DONE]``.  Token counts come from the server's ``usage`` (asked for
with ``stream_options.include_usage``) so they are the server's own tokenizer's
counts; when a server sends no usage the token chunks are counted instead.
A request never raises: any transport or protocol error is recorded in the
result so a dying server shows up as ``failed`` rather than a crash.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from loadtest.workload import SampleRequest


async def sse_lines(resp: httpx.Response):
    """The lines of an event stream, split at LF (and a CR before it) only, as the SSE spec
    says. httpx's aiter_lines splits like str.splitlines, also at U+2028, U+2029 and U+0085,
    which a server may send raw inside a JSON string (generated text): that cut one event in
    two and failed a request of ours with "Unterminated string"."""
    rest = ""
    async for text in resp.aiter_text():
        *lines, rest = (rest + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if rest:
        yield rest.removesuffix("\r")


@dataclass
class RequestSettings:
    """What every request of a run shares."""

    model: str
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    endpoint: str = "/v1/completions"
    extra_body: dict = field(default_factory=dict)  # more request fields, e.g. a peer's own sampling knobs


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between token chunks
    latency: float = 0.0  # seconds, request sent -> [DONE]
    start: float = 0.0  # perf_counter when sent
    usage_reported: bool = False
    generated_text: str = ""
    error: str = ""


def request_body(req: SampleRequest, settings: RequestSettings) -> dict:
    body = {
        "model": settings.model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; exact output lengths
    body.update(settings.extra_body)
    return body


def _error_text(status: int, raw: bytes) -> str:
    """The OpenAI-shaped error message when there is one, else the raw body."""
    text = raw.decode("utf-8", "replace")
    try:
        return f"HTTP {status}: {json.loads(text)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {text[:200]}"


async def send_request(
    client: httpx.AsyncClient, base_url: str, req: SampleRequest, settings: RequestSettings
) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len or 0)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    chunks: list[str] = []
    token_chunks = 0
    done = False
    res.start = last = time.perf_counter()
    try:
        async with client.stream(
            "POST", base_url + settings.endpoint, json=request_body(req, settings), headers=headers
        ) as resp:
            if resp.status_code != 200:
                res.error = _error_text(resp.status_code, await resp.aread())
                return res
            async for line in sse_lines(resp):
                if not line.startswith("data:"):
                    continue  # SSE comments and blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    return res
                now = time.perf_counter()
                choices = chunk.get("choices")
                if choices:  # text may be empty (a special token, half a UTF-8 character)
                    if token_chunks == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    last = now
                    token_chunks += 1
                    chunks.append("".join(c.get("text") or "" for c in choices))
                usage = chunk.get("usage")
                if usage:
                    res.usage_reported = True
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_len = int(usage.get("prompt_tokens") or res.prompt_len)
        res.latency = time.perf_counter() - res.start
    except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's result
        res.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return res
    if not done:
        res.error = "stream ended without [DONE]"
        return res
    if not res.usage_reported:
        res.output_tokens = token_chunks
    res.generated_text = "".join(chunks)
    res.success = True
    return res
