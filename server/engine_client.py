"""The server's side of the engine: loading, admission (backpressure), streams, abort, drain.

The engine owns its model on its own thread and calls `on_output` from there; this
module turns those callbacks into an asyncio queue per HTTP request. Every HTTP request
becomes one `Generation` (n choices x prompts engine requests): `start()` submits them and
`close()`, called whenever the HTTP exchange ends for ANY reason (done, client gone, error,
drain timeout), aborts the engine requests still running, which frees their KV memory.

Admission counts sequences, not HTTP requests: the engine runs `max_num_seqs` of them and
at most `max_queue` more may wait; beyond that a request is refused with 429 at once, which
keeps latency bounded and tells load balancers to go elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import AsyncIterator

from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.sampling import SamplingParams

from server.config import ServerConfig
from server.errors import APIError
from server.metrics import RequestTracker, ServerMetrics

logger = logging.getLogger("engram_serve")


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class Aborted:
    """Final output of a choice the server aborted itself (shaped like the engine's RequestOutput)."""

    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    new_token_ids: tuple = ()
    new_text: str = ""
    finished: bool = True
    finish_reason: str = "abort"
    logprobs: None = None
    gates: None = None
    error: None = None


class Generation:
    """One HTTP request's engine requests; iterate for `(choice_index, output)` until all finish."""

    def __init__(self, client: "EngineClient", request_id: str,
                 seqs: list[tuple[list[int], SamplingParams]]):
        self._client = client
        self._engine = client.engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._seqs = seqs
        self.request_id = request_id  # the HTTP request's (X-Request-Id), for logs
        self._rids: list[str] = []  # the engine's ids: a client's X-Request-Id need not be unique
        self._trackers: list[RequestTracker] = []
        self._unfinished: set[int] = set()
        self._aborted: set[int] = set()
        self._closed = False
        self._last_counts: dict[int, tuple[int, int]] = {}

    def start(self) -> None:
        """Hand every choice to the engine; on a refusal nothing stays admitted or running."""
        try:
            for i, (prompt_ids, params) in enumerate(self._seqs):
                tracker = self._client.metrics.track()
                self._trackers.append(tracker)
                self._rids.append(self._engine.add_request(prompt_ids, params, on_output=self._callback(i, tracker)))
                self._unfinished.add(i)
        except ValueError as e:  # the engine's own validation; ours should have caught it first
            self.close()
            raise APIError(400, str(e)) from None
        except BaseException:
            self.close()
            raise
        self._client._active.add(self)

    def _callback(self, index: int, tracker: RequestTracker):
        def on_output(out) -> None:  # engine thread: must be quick and must never raise
            try:
                tracker.observe(out)
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
            except RuntimeError:  # event loop already closed (server stopping)
                pass
            except Exception:
                logger.exception("metrics update failed for %s", self._rids[index])
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        return on_output

    async def __aiter__(self) -> AsyncIterator[tuple[int, object]]:
        while self._unfinished:
            index, out = await self._queue.get()
            if index not in self._unfinished:
                continue
            self._last_counts[index] = (out.num_prompt_tokens, out.num_output_tokens)
            if out.finished:
                self._unfinished.discard(index)
            yield index, out

    def abort(self) -> None:
        """Abort every unfinished choice; a waiting iterator receives `Aborted` outputs for them."""
        for index in sorted(self._unfinished - self._aborted):
            self._aborted.add(index)
            try:
                self._engine.abort(self._rids[index])
            except Exception:
                logger.exception("engine.abort(%s) failed", self._rids[index])
            self._trackers[index].finish("abort")
            prompt, output = self._last_counts.get(index, (len(self._seqs[index][0]), 0))
            self._queue.put_nowait((index, Aborted(num_prompt_tokens=prompt, num_output_tokens=output)))

    def close(self) -> None:
        """Abort what is still running and give the admission slots back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.abort()
        self._unfinished.clear()
        self._client._active.discard(self)
        self._client._release(len(self._seqs))


_UNAVAILABLE = {State.LOADING: ("the model is still loading; retry shortly", "loading"),
                State.DRAINING: ("the server is shutting down", "draining"),
                State.FAILED: ("the engine failed to load ({error}); the server log has the details", "engine_failed")}


class EngineClient:
    """Owns the engine for the app: state for /health, admission, generations, drain."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        self.engine_config = engine_config
        self.server_config = server_config
        self.engine: LLMEngine | None = None
        self.metrics: ServerMetrics | None = None
        self.state = State.LOADING
        self.load_error: str | None = None  # the exception's type: its text may name server files
        self.last_progress = time.monotonic()  # when a step last finished, or the idle engine got work
        self.model_name = server_config.served_model_name or "(loading)"
        self.capacity = engine_config.max_num_seqs + server_config.max_queue
        self._inflight = 0
        self._active: set[Generation] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ lifecycle
    async def load(self) -> None:
        """Build and start the engine off the event loop, so /health answers 503 meanwhile."""
        try:
            engine = await asyncio.to_thread(LLMEngine.launch, self.engine_config)
        except Exception as e:
            self.state = State.FAILED
            self.load_error = type(e).__name__
            logger.error("engine failed to load: %s: %s", self.load_error, e)
            raise
        self.engine = engine
        self.capacity = engine.max_num_seqs + self.server_config.max_queue  # the KV cache may hold fewer (GPU)
        self.model_name = self.server_config.served_model_name or engine.model_name
        self.metrics = ServerMetrics(self.model_name, self._engine_stats, self._table_snapshot)
        engine.add_step_observer(self._observe_step)
        if self.state is State.LOADING:
            self.state = State.READY
        logger.info("engine ready: model %s on %s in %s, max_model_len %d, engram layers %s", self.model_name,
                    engine.device.torch_device, engine.dtype, engine.max_model_len, engine.engram_layer_ids or "none")

    def _observe_step(self, seconds: float, _tokens: int) -> None:  # engine thread
        self.last_progress = time.monotonic()
        self.metrics.step.observe(seconds)

    def sequences_in_engine(self) -> int:
        """Sequences the engine runs or has queued (0 before it is loaded)."""
        stats = self._engine_stats()
        return stats.num_running + stats.num_waiting if stats is not None else 0

    def _engine_stats(self):
        return self.engine.stats() if self.engine is not None else None

    def _table_snapshot(self) -> dict | None:
        stats = self.engine.table_stats if self.engine is not None else None
        return stats.snapshot() if stats is not None else None

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, give in-flight ones `timeout` seconds, then abort the rest."""
        if self.state is State.READY:
            self.state = State.DRAINING
        logger.info("draining: %d sequences in flight, up to %.1f s", self._inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("shutdown timeout: aborting %d requests", len(self._active))
            for generation in list(self._active):
                generation.abort()
            try:  # let the handlers write their last frames
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                pass

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # ------------------------------------------------------------------ requests
    def check_available(self) -> LLMEngine:
        if self.state is State.READY:
            return self.engine
        raise APIError(503, self.unavailable_message(), code=_UNAVAILABLE[self.state][1])

    def unavailable_message(self) -> str:
        """Why requests are refused while not READY, in words without server paths."""
        return _UNAVAILABLE[self.state][0].format(error=self.load_error)

    def generate(self, request_id: str, seqs: list[tuple[list[int], SamplingParams]]) -> Generation:
        """Admit `len(seqs)` sequences or raise 429/503; the caller must `start()` then `close()` it."""
        self.check_available()
        if len(seqs) > self.capacity:
            raise APIError(400, f"the request needs {len(seqs)} sequences (prompts x n) but the server "
                           f"holds at most {self.capacity}", param="n")
        if self._inflight + len(seqs) > self.capacity:
            raise APIError(429, f"the server's queue is full ({self._inflight} sequences in flight, "
                           f"limit {self.capacity}); retry later", code="queue_full")
        if not self.sequences_in_engine():  # an idle engine's last step is no measure of a stuck one
            self.last_progress = time.monotonic()
        self._inflight += len(seqs)
        self._idle.clear()
        return Generation(self, request_id, seqs)

    def _release(self, count: int) -> None:
        self._inflight -= count
        if self._inflight == 0:
            self._idle.set()
