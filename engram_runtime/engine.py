"""LLMEngine: continuous batching in one loop thread that owns the model.

Split as in nano-vllm: the Scheduler decides who runs, the ModelRunner computes
logits, the sampler picks tokens; the engine glues them, takes requests from any
thread (add_request / abort put work in an inbox under a lock) and calls each
request's on_output from the loop thread with one delta per step.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from engram_runtime.allocator import keep_freed_memory
from engram_runtime.engine_config import DEFAULT_MAX_MODEL_LEN, EngineConfig, resolve_device, resolve_dtype
from engram_runtime.kv_budget import profile_slots
from engram_runtime.model import linear_sources
from engram_runtime.model_runner import Chunk, ModelRunner
from engram_runtime.quantization import describe, kinds, linear_blocks, serving_mode
from engram_runtime.sampling import SamplingParams, sample
from engram_runtime.scheduler import ScheduledBatch, Scheduler
from engram_runtime.sequence import IncrementalDetokenizer, RequestOutput, Sequence
from engram_runtime.tokenizer import eos_token_ids
from engram_runtime.weights import DEFAULT_MODEL_NAME, LoadedModel, load_model
from offload.device import ComputeDevice

log = logging.getLogger(__name__)

@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, tokens held / (max_num_seqs * max_model_len)
    num_steps: int
    num_prompt_tokens: int  # totals since start
    num_generation_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, device: ComputeDevice | None = None):
        """loaded: weights + tokenizer already read for config.model (tests reuse one load);
        device: instead of config.device (the tests' stand-ins, offload.device.ComputeDevice)."""
        keep_freed_memory()  # a step's freed tensors are reused, not faulted in again (see allocator)
        self.config = config
        loaded = loaded or load_model(config.model)
        model_config = loaded.config
        self.model_config = model_config
        # like vLLM: the served name is what the user passed; the default model gets its short id
        self.model_name = DEFAULT_MODEL_NAME if config.model is None else str(config.model)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = eos_token_ids(self.tokenizer, model_config.eos_token_ids)
        self.max_model_len = config.max_model_len or min(
            model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN
        )
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.device = device or ComputeDevice(resolve_device(config.device))
        dtype = resolve_dtype(config.dtype, str(self.device.torch_device))
        self.dtype = str(dtype).removeprefix("torch.")
        self.runner, self.max_num_seqs = self._runner(loaded, dtype)
        log.info("serving on %s in %s, %d sequences of up to %d tokens", self.device.torch_device, self.dtype,
                 self.max_num_seqs, self.max_model_len)
        self.engram = None
        self.table_stats = None
        self.engram_layer_ids: list[int] = []
        self.graphs = None
        if config.engram is not None:
            from engram_runtime.engram_runner import EngramRunner

            self.attach_engram(EngramRunner.load(config, self.tokenizer, self.runner))
        else:
            self.graphs = self._graphs()
        self.scheduler = Scheduler(self.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._abort_ids: list[str] = []
        self._live: dict[str, Sequence] = {}  # guarded by _lock
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._num_steps = self._prompt_tokens = self._gen_tokens = 0
        self._step_observers: list[Callable[[float, int], None]] = []

    def _runner(self, loaded: LoadedModel, dtype: torch.dtype) -> tuple[ModelRunner, int]:
        """The backbone on the device; on CUDA with as many KV slots as fit (kv_budget); on the
        native CPU path with the quantised weights config.quantization selects."""
        config, model_config, state_dict = self.config, loaded.config, loaded.state_dict
        blocks: dict = {}
        if not (self.device.cuda_primitives or self.device.portable):  # the GPU's path computes dense
            blocks = linear_blocks(linear_sources(model_config, state_dict), state_dict, loaded.blocks,
                                   serving_mode(config.quantization))
            log.info("quantization %s: %s", config.quantization, describe(blocks))
        self.quantization = kinds(blocks)
        if not self.device.cuda_primitives:
            return ModelRunner(model_config, state_dict, dtype, config.max_num_seqs, self.max_model_len,
                               device=self.device, blocks=blocks), config.max_num_seqs
        free, total = self.device.memory()
        runner = ModelRunner(model_config, state_dict, dtype, 1, self.max_model_len, device=self.device)
        reserved = total - free + self._device_table_bytes()  # other processes, and tables to come in HBM
        budget = profile_slots(runner, config.max_num_batched_tokens, reserved, config.gpu_memory_utilization,
                               config.max_num_seqs)
        runner.set_num_slots(budget.slots)
        return runner, budget.slots

    def _device_table_bytes(self) -> int:
        """Bytes of the Engram tables to be loaded into GPU memory (placement device), from the
        checkpoint's manifest: the KV cache must leave room for them."""
        if self.config.engram is None or self.config.table_placement != "device":
            return 0
        from engram_runtime.checkpoint_format import read_manifest

        manifest, _ = read_manifest(self.config.engram)
        return sum(int(entry["nbytes"]) for entry in manifest["tables"].values())

    def attach_engram(self, engram) -> None:
        """Serve with this EngramRunner (made for this engine's runner: its device, dtype, slots),
        or none, from the next step on, closing the one before; the decode graphs are captured
        anew. For memory made elsewhere than a checkpoint directory (bench.synthetic's in-memory
        tables); call it between requests."""
        if self.engram is not None:
            self.engram.close()
        self.engram = engram
        self.table_stats = engram.table_stats if engram is not None else None
        self.engram_layer_ids = engram.layer_ids if engram is not None else []
        self.graphs = self._graphs()

    def _graphs(self):
        """Decode graphs captured now, on CUDA unless enforce_eager, when the Engram step (if any)
        is device work alone."""
        if not self.device.cuda_primitives or self.config.enforce_eager:
            return None
        if self.engram is not None and not self.engram.graphable:
            log.info("CUDA graphs off: the Engram tables are read through host staging, which runs eagerly")
            return None
        from engram_runtime.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.runner, self.max_num_seqs, self.engram)
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", graphs.sizes, graphs.capture_seconds)
        return graphs

    # ---- public API (any thread) ----
    @classmethod
    def launch(cls, *args, **kwargs) -> "LLMEngine":
        """Build an engine on a new thread that then runs its step loop; return it once built
        (re-raising what the build raised). Loading and stepping share the thread because OpenMP
        keeps a pool of workers for every thread that ran a parallel op, and libgomp spins its
        waiting workers only while no more threads than cores sit in pools: a loader's idle pool
        beside the engine's makes every parallel op of a step sleep and wake its workers instead,
        which doubles a two-thread decode step (docs/performance.md, "Compute threads")."""
        built: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            try:
                engine = cls(*args, **kwargs)
            except BaseException as exc:  # the caller re-raises it
                built.put(exc)
                return
            engine._thread = threading.current_thread()
            built.put(engine)
            engine._loop()

        threading.Thread(target=run, name="engram-engine", daemon=True).start()
        result = built.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None],
        request_id: str | None = None,
    ) -> str:
        params.validate()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the context window (max_model_len) is "
                f"{self.max_model_len}: the prompt must be shorter to leave room for output"
            )
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._live:
                raise ValueError(f"request_id {rid!r} is already in use")
            seq = Sequence(
                request_id=rid,
                prompt_token_ids=prompt,
                params=params,
                on_output=on_output,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt),
                eos_token_ids=self.eos_token_ids,
                generator=params.make_generator(),
            )
            self._live[rid] = seq
            self._inbox.append(seq)
            self._lock.notify()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._abort_ids.append(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self._inbox)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=waiting + len(self.scheduler.waiting),
            kv_cache_usage=self.scheduler.kv_cache_usage(),
            num_steps=self._num_steps,
            num_prompt_tokens=self._prompt_tokens,
            num_generation_tokens=self._gen_tokens,
        )

    def add_step_observer(self, fn: Callable[[float, int], None]) -> None:
        """fn(step_seconds, num_tokens) is called from the engine thread after every step."""
        self._step_observers.append(fn)

    def check_health(self) -> str | None:
        """Why this engine cannot serve now, in words without server paths, or None (vLLM's name;
        a reason instead of an exception, for a readiness body): its loop thread died, or its
        Engram memory cannot be read (EngramRunner.check_health). Whether a step is stuck is the
        caller's to judge from the step observers, against its own timeout."""
        if self._thread is not None and not self._thread.is_alive():
            return "the engine loop has stopped"
        return self.engram.check_health() if self.engram is not None else None

    def shutdown(self) -> None:
        """Stop the loop, abort what is left, close the memory and the device's side-stream worker
        (restarted on the device's next use, so a device given to the engine stays usable)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._abort_ids.extend(self._live)
        self._drain_inbox()
        if self.engram is not None:
            self.engram.close()
        self.device.close()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    # ---- engine thread ----
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._inbox or self._abort_ids or self.scheduler.has_work()):
                    self._lock.wait()
                if self._stopping:
                    return
            self._drain_inbox()
            if self.scheduler.has_work():
                self.step()

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._abort_ids = self._abort_ids, []
        for seq in new:
            if seq.params.max_tokens == 0:
                seq.finish_reason = "length"
                self._finish(seq)
            else:
                self.scheduler.add(seq)
        for rid in aborts:
            seq = self._live.get(rid)
            if seq is not None and seq.finish_reason is None:
                seq.finish_reason = "abort"
                self._finish(seq)

    def step(self) -> None:
        """One engine step: schedule, forward (decode chunks, then prefill chunks), sample, emit."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return
        now = time.monotonic()
        for seq, _ in batch.prefill:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        to_sample: list[Sequence] = []
        logits: list[torch.Tensor] = []
        gates: list = []  # per forward group: its sampled rows' gates (EngramStep.gates)
        hooks = []
        for group in self._forward_groups(batch):
            seqs, chunks = zip(*group)
            chunks = list(chunks)
            try:
                if self.graphs is not None and self.graphs.takes(chunks):
                    out, hook = self.graphs.run(chunks)
                else:
                    hook = self.engram.submit(chunks, [s.all_token_ids for s in seqs]) if self.engram else None
                    out = self.runner.forward(chunks, hook)
            except Exception as exc:  # a failing batch must not take the loop down
                log.exception("forward failed")
                for seq in seqs:
                    self._fail(seq, exc)
                continue
            picked = []
            for i, (seq, chunk) in enumerate(group):
                seq.num_computed += len(chunk.token_ids)
                if not seq.in_prefill:  # a finished prompt or a decode chunk: sample its next token
                    picked.append(i)
                    to_sample.append(seq)
            if hook is not None:
                hooks.append(hook)
            if picked:
                rows = None if len(picked) == len(group) else torch.tensor(picked, device=out.device)
                logits.append(out if rows is None else out.index_select(0, rows))
                if hook is not None:
                    gates.append(hook.gates(picked))
        if to_sample:
            self._sample_and_emit(to_sample, torch.cat(logits) if len(logits) > 1 else logits[0], gates)
        for hook in hooks:  # after the transfer, the step's device timings are readable
            hook.finish()
        self._num_steps += 1
        n_tokens = len(batch.decode) + sum(n for _, n in batch.prefill)
        self._prompt_tokens += sum(n for _, n in batch.prefill)
        dt = time.perf_counter() - t0
        for fn in self._step_observers:
            fn(dt, n_tokens)

    def _forward_groups(self, batch: ScheduledBatch) -> list[list[tuple[Sequence, Chunk]]]:
        groups = []
        if batch.decode:
            groups.append([(s, Chunk(s.slot, s.pending_token_ids(), s.num_computed)) for s in batch.decode])
        if batch.prefill:
            groups.append(
                [(s, Chunk(s.slot, s.pending_token_ids()[:n], s.num_computed)) for s, n in batch.prefill]
            )
        return groups

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor, gates: list) -> None:
        """gates: per forward group its rows' Engram gates, host lists or device tensors; a device's
        go to the host with the sampled tokens, in the step's one transfer."""
        on_device = [g for g in gates if isinstance(g, torch.Tensor)]
        try:
            result = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                            torch.cat(on_device) if on_device else None)
        except Exception as exc:
            log.exception("sampling failed")
            for seq in seqs:
                self._fail(seq, exc)
            return
        gate_rows = result.extra if on_device else [row for group in gates for row in group]
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            try:
                if seq.first_token_time is None:
                    seq.first_token_time = now
                token = result.token_ids[i]
                seq.append_token(token, self.max_model_len)
                self._gen_tokens += 1
                lp = [result.logprobs[i]] if result.logprobs[i] is not None else None
                g = None
                if seq.params.engram_gates and gate_rows:
                    g = [dict(zip(self.engram_layer_ids, gate_rows[i]))]
                self._emit(seq, [token], lp, g)
            except Exception as exc:
                self._fail(seq, exc)

    def _emit(self, seq: Sequence, token_ids: list[int], logprobs=None, gates=None, error: str | None = None):
        finished = seq.finish_reason is not None
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            new_text=seq.take_new_text(),
            finished=finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            logprobs=logprobs,
            gates=gates,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            error=error,
        )
        if finished:
            self._release(seq)
        try:
            seq.on_output(out)
        except Exception:  # the consumer is broken or gone: stop generating for it
            log.exception("on_output callback of %s failed; aborting it", seq.request_id)
            if not finished:
                seq.finish_reason = "abort"
                self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)  # frees the KV slot; the Engram conv state is reset when the slot is reused
        with self._lock:
            self._live.pop(seq.request_id, None)

    def _finish(self, seq: Sequence) -> None:
        self._emit(seq, [])

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        seq.finish_reason = "error"
        msg = f"{type(exc).__name__}: {exc}"
        log.debug("request %s failed: %s", seq.request_id, traceback.format_exc())
        self._emit(seq, [], error=msg)

    # ---- synchronous driving (offline LLM, tests) ----
    def run_until_done(self) -> None:
        """Drive the loop in the calling thread until every request has finished.
        Only for use when start() was not called."""
        if self._thread is not None:
            raise RuntimeError("run_until_done() cannot be used while the engine thread runs")
        while self.has_unfinished():
            self._drain_inbox()
            if self.scheduler.has_work():
                self.step()
