"""Offline batch generation: `LLM().generate(prompts, SamplingParams(...))`.

A thin layer over LLMEngine, driven in the caller's thread (no loop thread), so
all prompts are batched by the same scheduler the server uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.sampling import SamplingParams
from engram_runtime.sequence import RequestOutput
from engram_runtime.weights import LoadedModel


@dataclass
class CompletionOutput:
    prompt: str | list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict] | None = None
    gates: list[dict[int, float]] | None = None
    error: str | None = None


class LLM:
    def __init__(self, model: str | None = None, engram: str | None = None, loaded: LoadedModel | None = None,
                 engine: LLMEngine | None = None, **engine_kwargs):
        """engine_kwargs: EngineConfig fields (device, dtype, max_num_seqs, ...); engine: drive an
        engine made elsewhere instead (the tests' device stand-ins)."""
        self.engine = engine or LLMEngine(EngineConfig(model=model, engram=engram, **engine_kwargs), loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_chat_template: bool = False,
    ) -> list[CompletionOutput]:
        """prompts: strings (tokenised without special tokens added, or wrapped as one
        user message with use_chat_template) or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        outputs = [CompletionOutput(prompt=p) for p in prompts]

        def collect(out_obj: CompletionOutput):
            def on_output(o: RequestOutput) -> None:
                out_obj.text += o.new_text
                out_obj.token_ids += o.new_token_ids
                if o.logprobs:
                    out_obj.logprobs = (out_obj.logprobs or []) + o.logprobs
                if o.gates:
                    out_obj.gates = (out_obj.gates or []) + o.gates
                if o.finished:
                    out_obj.finish_reason, out_obj.error = o.finish_reason, o.error

            return on_output

        for prompt, p, out in zip(prompts, params_list, outputs):
            self.engine.add_request(self.encode(prompt, use_chat_template), p, collect(out))
        self.engine.run_until_done()
        return outputs

    def encode(self, prompt: str | list[int], use_chat_template: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if use_chat_template:
            return list(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                    return_dict=False,
                )
            )
        return self.tokenizer(prompt, add_special_tokens=False).input_ids
