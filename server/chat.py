"""POST /v1/chat/completions: messages through the model's own chat template, streaming or not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from server.engine_client import EngineClient, Generation
from server.errors import APIError
from server.generation import (SSE_DONE, SSEResponse, TokenText, check_model, engine_error, gate_entries, response_id,
                               resolve_max_tokens, sampling_params, sse, sse_error, unless_disconnected,
                               without_gates)
from server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                             ChatDelta, ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob,
                             GateEntry, TopLogprob, UsageInfo)
from server.request_id import request_id


def render_prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    """Token ids of the conversation rendered by the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may reject a conversation (e.g. role order) by raising
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _token_logprob(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    text = token_text(token_id)
    return TopLogprob(token=text, logprob=float(logprob), bytes=list(text.encode("utf-8")))


def _logprobs(out, token_text: TokenText) -> ChatLogprobs:
    content = []
    for entry in out.logprobs or ():
        top = [_token_logprob(t, v, token_text) for t, v in entry.get("top", {}).items()]
        main = _token_logprob(entry["token_id"], entry["logprob"], token_text)
        content.append(ChatTokenLogprob(**main.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: ChatLogprobs = field(default_factory=ChatLogprobs)
    gates: list[GateEntry] = field(default_factory=list)
    finish_reason: str | None = None
    output_tokens: int = 0


async def create_chat_completion(req: ChatCompletionRequest, request: Request, client: EngineClient):
    engine = client.check_available()
    check_model(req.model, client)
    prompt_ids = render_prompt(req, engine.tokenizer)
    max_tokens = resolve_max_tokens(req.requested_max_tokens(), None, len(prompt_ids), engine.max_model_len,
                                    "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    seqs = [(prompt_ids, sampling_params(req, client, max_tokens, logprobs, j)) for j in range(req.n)]
    rid = request_id(request)
    completion_id = response_id("chatcmpl", rid)
    generation = client.generate(rid, seqs)
    generation.start()
    token_text = TokenText(engine.tokenizer)
    if req.stream:
        return SSEResponse(_stream(req, generation, completion_id, client.model_name, len(prompt_ids), token_text),
                           generation)
    choices = await unless_disconnected(request, generation, _collect(req, generation, token_text))
    completion_tokens = sum(c.output_tokens for c in choices)
    response = ChatCompletionResponse(
        id=completion_id, model=client.model_name,
        choices=[ChatChoice(index=i, message=ChatResponseMessage(content="".join(c.text)),
                            logprobs=c.logprobs if req.logprobs else None, finish_reason=c.finish_reason,
                            engram_gates=c.gates if req.engram_gates else None)
                 for i, c in enumerate(choices)],
        usage=UsageInfo.of(len(prompt_ids), completion_tokens))
    return JSONResponse(response.model_dump(exclude=without_gates(req.engram_gates)))


async def _collect(req: ChatCompletionRequest, generation: Generation, token_text: TokenText) -> list[_Choice]:
    choices = [_Choice() for _ in range(req.n)]
    async for i, out in generation:
        if out.finish_reason == "error":
            raise engine_error(out, generation)
        c = choices[i]
        c.text.append(out.new_text)
        if req.logprobs and out.logprobs:
            c.logprobs.content.extend(_logprobs(out, token_text).content)
        if req.engram_gates and out.gates:  # every token has gates (the gate metric); few ask for them
            c.gates.extend(gate_entries(out, token_text))
        c.output_tokens = out.num_output_tokens
        if out.finished:
            c.finish_reason = out.finish_reason
    return choices


async def _stream(req: ChatCompletionRequest, generation: Generation, completion_id: str, model: str,
                  prompt_tokens: int, token_text: TokenText):
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    output_tokens = [0] * req.n

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        body = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        data = body.model_dump(exclude=None if include_usage else {"usage"})
        for choice in data["choices"]:  # OpenAI sends the role only in a choice's first delta
            if choice["delta"]["role"] is None:
                del choice["delta"]["role"]
            if not req.engram_gates:
                del choice["engram_gates"]
        return sse(data)

    # OpenAI opens every choice with a role-only delta.
    for i in range(req.n):
        yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    async for i, out in generation:
        if out.finish_reason == "error":
            yield sse_error(engine_error(out, generation))
            yield SSE_DONE
            return
        output_tokens[i] = out.num_output_tokens
        if not (out.new_text or out.new_token_ids or out.finished):
            continue
        yield chunk([ChatStreamChoice(
            index=i, delta=ChatDelta(content=out.new_text),
            logprobs=_logprobs(out, token_text) if req.logprobs else None,
            finish_reason=out.finish_reason if out.finished else None,
            engram_gates=gate_entries(out, token_text) if req.engram_gates else None)])
    if include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, sum(output_tokens)))
    yield SSE_DONE
