"""Server-side settings (the engine has its own `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # When set, every /v1 route requires `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    # Sequences allowed to wait beyond the engine's max_num_seqs before new requests
    # get 429: a bounded queue keeps latency bounded instead of growing without limit.
    max_queue: int = 256
    # Seconds in-flight requests get to finish after SIGTERM before they are aborted.
    shutdown_timeout: float = 30.0
    # Seconds without a finished engine step while sequences wait before /health answers 503
    # (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S): well above the longest step, a full prefill chunk.
    engine_iteration_timeout: float = 60.0
    # Name clients use in the `model` field; default: the engine's model name.
    served_model_name: str | None = None
    log_level: str = "info"
