"""Request and response bodies of the OpenAI-compatible API (pydantic).

Shapes follow OpenAI's completions and chat completions, with vLLM's extensions
(`top_k`, `stop_token_ids`, `ignore_eos`) and ours (`engram_gates`). Requests are
strict: a string where a number belongs is a 400, not a silent conversion, and
unknown fields are ignored the way vLLM ignores them. Fields OpenAI or vLLM define
but this server does not implement (tools, structured output, penalties ...:
UNSUPPORTED) are accepted only absent, null or at their neutral value and refused
with a 400 naming them otherwise, so a client never gets a different behaviour than
it asked for without being told. Bookkeeping fields (`user`, `metadata`, `store`,
`service_tier` ...) change no output and stay ignored.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, model_validator
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_N = 128        # OpenAI's limit on n

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
StopStrings = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


# Per route, the fields it does not implement and the values that ask for the default
# behaviour (absent and null are always accepted). docs/serving.md lists them.
UNSUPPORTED_SAMPLING = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (), "structured_outputs": (), "repetition_penalty": (1,), "min_p": (0,),
    "min_tokens": (0,), "use_beam_search": (False,), "length_penalty": (1,), "prompt_logprobs": (),
    "bad_words": ([],), "allowed_token_ids": (), "logits_processors": (), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (),
    "return_tokens_as_token_ids": (False,),
}
UNSUPPORTED_COMPLETION = {"suffix": ("",)}
UNSUPPORTED_CHAT = {
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (), "functions": ([],),
    "function_call": ("none",), "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
    "verbosity": ("medium",), "web_search_options": (), "echo": (False,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "chat_template": (), "chat_template_kwargs": ({},), "documents": (),
}
UNSUPPORTED = {**UNSUPPORTED_SAMPLING, **UNSUPPORTED_COMPLETION, **UNSUPPORTED_CHAT}


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    neutral = UNSUPPORTED[info.field_name]
    if value is None or value in neutral:
        return value
    also = "".join(f", or send {json.dumps(v)}" for v in neutral)
    raise PydanticCustomError("unsupported", "not supported by this server (leave it out{also})", {"also": also})


Unsupported = Annotated[Any, BeforeValidator(_refuse_unsupported)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _refusing(name: str, fields: dict[str, tuple]) -> type[_Strict]:
    """A base model declaring `fields` as Unsupported, so each is validated (and named) on its own."""
    return create_model(name, __base__=_Strict, **{field: (Unsupported, None) for field in fields})


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_refusing("_UnsupportedSampling", UNSUPPORTED_SAMPLING)):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="vLLM extension: sample from the k most likely tokens; 0 or -1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Annotated[str, Field(min_length=1)] | StopStrings | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] = []
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    engram_gates: bool = Field(False, description="Engram extension: per generated token, the mean gate of every Engram layer")
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields, _refusing("_UnsupportedCompletion", UNSUPPORTED_COMPLETION)):
    prompt: (Annotated[str, Field(max_length=1_000_000)]
             | Annotated[list[Annotated[str, Field(max_length=1_000_000)]], Field(min_length=1, max_length=64)]
             | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=64)])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, description="accepted only when equal to n")

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields, _refusing("_UnsupportedChat", UNSUPPORTED_CHAT)):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ----------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class GateEntry(BaseModel):
    """One generated token and the mean gate of each Engram layer (keys: layer ids)."""

    token: str
    gates: dict[str, float]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    engram_gates: list[GateEntry] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    engram_gates: list[GateEntry] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    engram_gates: list[GateEntry] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "engram-serve"
    root: str
    max_model_len: int
    engram_layers: list[int]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
