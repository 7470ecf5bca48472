"""What completions and chat completions share: request -> engine sequences, outputs -> fields, SSE.

Both routes turn a request into `(prompt_ids, SamplingParams)` per choice, run them as one
`Generation`, and format token-level extras (logprobs, Engram gates) the same way. The
streaming response and the non-streaming wait both watch the connection, so a client that
goes away has its engine requests aborted at once, not at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engram_runtime.sampling import SamplingParams

from server.engine_client import EngineClient, Generation
from server.errors import APIError, error_body, internal_error
from server.protocol import GateEntry, SamplingFields

T = TypeVar("T")
logger = logging.getLogger("engram_serve")


def response_id(prefix: str, request_id: str) -> str:
    """The completion's id, made from the request id as vLLM does (`cmpl-<X-Request-Id>`)."""
    return f"{prefix}-{request_id}"


def check_model(requested: str | None, client: EngineClient) -> None:
    if requested is not None and requested != client.model_name:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                       f"`{client.model_name}`", param="model", code="model_not_found")


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int,
                       max_model_len: int, prompt_param: str) -> int:
    """OpenAI semantics: an explicit max_tokens that does not fit is an error, a default is clipped."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    room = max_model_len - prompt_len
    if room < 1 or (requested is not None and requested > room):
        asked = f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion)" \
            if requested is not None else f"{prompt_len} tokens in the prompt"
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {asked}. Please reduce the length of the prompt or completion.",
                       param=prompt_param, code="context_length_exceeded")
    if requested is not None:
        return requested
    return room if default is None else min(default, room)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range (vocabulary size {vocab_size})", param=param)


def sampling_params(req: SamplingFields, client: EngineClient, max_tokens: int,
                    logprobs: int | None, choice: int) -> SamplingParams:
    """Engine parameters for choice `choice` of n; seeds differ per choice like vLLM (seed + index)."""
    engine = client.engine
    has_engram = bool(engine.engram_layer_ids)
    if req.engram_gates and not has_engram:
        raise APIError(400, "engram_gates needs an Engram model; this server runs without Engram",
                       param="engram_gates")
    check_token_ids(req.stop_token_ids, len(engine.tokenizer), "stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=None if req.seed is None else (req.seed + choice) % 2**63,
            stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            engram_gates=has_engram,  # always on with Engram: feeds engram_gate_mean
        )
    except ValueError as e:  # the engine's own checks, should ours ever be looser
        raise APIError(400, str(e)) from None


class TokenText:
    """Text of single tokens (for logprobs and gates), cached: the same ids recur constantly."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def without_gates(requested: bool, nested: bool = True):
    """`exclude=` for model_dump: the engram_gates field appears only when the client asked for it."""
    if requested:
        return None
    return {"choices": {"__all__": {"engram_gates"}}} if nested else {"engram_gates"}


def gate_entries(out, token_text: TokenText) -> list[GateEntry]:
    return [GateEntry(token=token_text(t), gates={str(k): float(v) for k, v in g.items()})
            for t, g in zip(out.new_token_ids, out.gates or ())]


def engine_error(out, generation: Generation) -> APIError:
    """The engine failed this request: the detail (it may name server files) goes to the log only."""
    logger.error("request %s: generation failed: %s", generation.request_id, out.error or "unknown engine error")
    return internal_error(generation.request_id, code="engine_error")


# ----------------------------------------------------------------------------- transport


# Unicode line breaks that JSON leaves raw: clients splitting lines like str.splitlines (httpx's
# iter_lines does) would cut an event at them, so they go out escaped, which JSON allows.
_LINE_BREAK_ESCAPES = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\u0085\u2028\u2029"})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAK_ESCAPES)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(err: APIError) -> str:
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and abort the engine work) as soon as the client disconnects.

    Starlette only notices a disconnect on its next write; a request still waiting in the
    queue writes nothing for a while, so the receive channel is watched alongside.
    """

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            streamed, _ = await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()
            self._generation.close()
        if isinstance(streamed, Exception) and not isinstance(streamed, OSError):  # OSError: client gone
            logger.error("stream of %s failed", self._generation.request_id, exc_info=streamed)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, generation: Generation, work: Awaitable[T]) -> T:
    """Await `work` (which consumes `generation`); if the client disconnects first, stop and abort."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise APIError(499, "client disconnected")
        return task.result()
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
        generation.close()
