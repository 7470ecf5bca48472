"""POST /v1/completions: prompts as text or token ids, n, echo, legacy logprobs, streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from server.engine_client import EngineClient, Generation
from server.errors import APIError
from server.generation import (SSE_DONE, SSEResponse, TokenText, check_model, check_token_ids, engine_error,
                               gate_entries, response_id, resolve_max_tokens, sampling_params, sse, sse_error,
                               unless_disconnected, without_gates)
from server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                             GateEntry, UsageInfo)
from server.request_id import request_id

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def _prompts(req: CompletionRequest, client: EngineClient) -> list[tuple[list[int], str]]:
    """(token ids, text) per prompt; the text is what `echo` returns."""
    tokenizer = client.engine.tokenizer
    prompt = req.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else prompt
        return [(tokenizer.encode(t, add_special_tokens=False), t) for t in texts]
    id_lists = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in id_lists:
        check_token_ids(ids, len(tokenizer), "prompt")
    return [(list(ids), tokenizer.decode(ids) if req.echo else "") for ids in id_lists]


def _logprobs(out, token_text: TokenText, offset: int) -> CompletionLogprobs:
    """Legacy completion logprobs for one delta; `offset` = characters of this choice's text so far."""
    lp = CompletionLogprobs()
    for entry in out.logprobs or ():
        token = token_text(entry["token_id"])
        lp.tokens.append(token)
        lp.token_logprobs.append(float(entry["logprob"]))
        lp.top_logprobs.append({token_text(t): float(v) for t, v in entry.get("top", {}).items()})
        lp.text_offset.append(offset)
        offset += len(token)
    return lp


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    gates: list[GateEntry] = field(default_factory=list)
    chars: int = 0
    finish_reason: str | None = None
    output_tokens: int = 0


def _plan(req: CompletionRequest, client: EngineClient):
    engine = client.engine
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo together with logprobs needs prompt logprobs, which this server does not "
                       "compute; use one or the other", param="echo")
    prompts = _prompts(req, client)
    seqs, echoes = [], []
    for ids, text in prompts:
        max_tokens = resolve_max_tokens(req.max_tokens, DEFAULT_MAX_TOKENS, len(ids), engine.max_model_len,
                                        "prompt")
        for j in range(req.n):
            seqs.append((ids, sampling_params(req, client, max_tokens, req.logprobs, j)))
            echoes.append(text if req.echo else "")
    return prompts, seqs, echoes


async def create_completion(req: CompletionRequest, request: Request, client: EngineClient):
    client.check_available()
    check_model(req.model, client)
    prompts, seqs, echoes = _plan(req, client)
    rid = request_id(request)
    completion_id = response_id("cmpl", rid)
    generation = client.generate(rid, seqs)
    generation.start()
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    token_text = TokenText(client.engine.tokenizer)
    if req.stream:
        return SSEResponse(_stream(req, generation, completion_id, client.model_name, echoes, prompt_tokens,
                                   token_text), generation)
    choices = await unless_disconnected(request, generation, _collect(req, generation, echoes, token_text))
    response = CompletionResponse(
        id=completion_id, model=client.model_name,
        choices=[CompletionChoice(index=i, text="".join(c.text),
                                  logprobs=c.logprobs if req.logprobs is not None else None,
                                  finish_reason=c.finish_reason,
                                  engram_gates=c.gates if req.engram_gates else None)
                 for i, c in enumerate(choices)],
        usage=_usage(prompt_tokens, choices))
    return JSONResponse(response.model_dump(exclude=without_gates(req.engram_gates)))


def _usage(prompt_tokens: int, choices: list[_Choice]) -> UsageInfo:
    return UsageInfo.of(prompt_tokens, sum(c.output_tokens for c in choices))


async def _collect(req: CompletionRequest, generation: Generation, echoes: list[str],
                   token_text: TokenText) -> list[_Choice]:
    choices = [_Choice(text=[e], chars=len(e)) for e in echoes]
    async for i, out in generation:
        if out.finish_reason == "error":
            raise engine_error(out, generation)
        c = choices[i]
        if req.logprobs is not None and out.logprobs:
            delta = _logprobs(out, token_text, c.chars)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(c.logprobs, name).extend(getattr(delta, name))
        if req.engram_gates and out.gates:  # every token has gates (the gate metric); few ask for them
            c.gates.extend(gate_entries(out, token_text))
        c.text.append(out.new_text)
        c.chars += len(out.new_text)
        c.output_tokens = out.num_output_tokens
        if out.finished:
            c.finish_reason = out.finish_reason
    return choices


async def _stream(req, generation: Generation, completion_id: str, model: str, echoes: list[str],
                  prompt_tokens: int, token_text: TokenText):
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    choices = [_Choice(chars=len(e)) for e in echoes]
    pending_echo = [bool(e) for e in echoes]
    async for i, out in generation:
        if out.finish_reason == "error":
            yield sse_error(engine_error(out, generation))
            yield SSE_DONE
            return
        c = choices[i]
        c.output_tokens = out.num_output_tokens
        if not (out.new_text or out.new_token_ids or out.finished or pending_echo[i]):
            continue
        text = (echoes[i] if pending_echo[i] else "") + out.new_text
        pending_echo[i] = False
        choice = CompletionChoice(
            index=i, text=text, finish_reason=out.finish_reason if out.finished else None,
            logprobs=_logprobs(out, token_text, c.chars) if req.logprobs is not None else None,
            engram_gates=gate_entries(out, token_text) if req.engram_gates else None)
        c.chars += len(out.new_text)
        chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                 "choices": [choice.model_dump(exclude=without_gates(req.engram_gates, nested=False))]}
        if include_usage:
            chunk["usage"] = None
        yield sse(chunk)
    if include_usage:
        yield sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": _usage(prompt_tokens, choices).model_dump()})
    yield SSE_DONE
