"""Real engram-serve processes (uvicorn in a subprocess) shared by the server tests.

The main one runs a tiny Engram checkpoint (engram-init with a few thousand rows per head, made
once per session) so the Engram paths (gates, table metrics) are exercised for real,
with a short context window so every generation stays cheap on 2 CPU cores.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from engram_runtime.checkpoint_init import InitOptions, engram_init
from loadtest.process import ServerProcess, engram_serve_cmd

API_KEY = "test-key-123"
MAX_MODEL_LEN = 96
MAX_NUM_SEQS = 8
ENGRAM_LAYERS = [1, 15]


@pytest.fixture(scope="session")
def engram_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("engram") / "tiny"
    engram_init(InitOptions(out=path, rows_per_head=2000, dtype="float32", progress=False))
    return str(path)


@pytest.fixture(scope="session")
def _servers(engram_ckpt, tmp_path_factory):
    """Both servers of this suite, launched together: model loading is mostly single-threaded, so
    two loads in parallel take little longer than one."""
    logs = tmp_path_factory.mktemp("logs")
    main = ServerProcess(engram_serve_cmd(["--engram", engram_ckpt, "--max-model-len", str(MAX_MODEL_LEN),
                                           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", "64",
                                           "--api-key", API_KEY, "--shutdown-timeout", "5"]),
                         logs / "engram-serve.log")
    # One running sequence and a queue of one reach the limits with three requests; no Engram,
    # so the metrics must be complete without tables too.
    small = ServerProcess(engram_serve_cmd(["--no-engram", "--max-model-len", "256", "--max-num-seqs", "1",
                                            "--max-queue", "1", "--shutdown-timeout", "60"]),
                          logs / "engram-serve-small.log")
    for srv in (main, small):
        srv.launch()
    yield {"main": main, "small": small}
    for srv in (main, small):  # both drain and exit in parallel
        srv.signal()
    for srv in (main, small):
        srv.stop()


@pytest.fixture(scope="session")
def server(_servers) -> ServerProcess:
    _servers["main"].wait_healthy()
    return _servers["main"]


@pytest.fixture(scope="session")
def small_server(_servers) -> ServerProcess:
    _servers["small"].wait_healthy()
    return _servers["small"]


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def oai(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]
