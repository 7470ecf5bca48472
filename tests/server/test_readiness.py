"""Readiness and liveness under faults, and what a 500 shows, against a real server on 127.0.0.1.

The server here runs under uvicorn in this process (a thread), so the tests can break what an
operator cannot reach from outside: stall the engine's step, stop its prefetch worker. Its
tables are served from `mmap` out of a copy of the session's checkpoint, so truncating one
hurts no other test. The truncation is irreversible and runs last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from engram_runtime.engine_config import EngineConfig
from engram_runtime.prefetch import Prefetcher
from loadtest.process import free_port
from server.app import create_app
from server.config import ServerConfig

pytestmark = pytest.mark.slow

ITERATION_TIMEOUT = 3.0
BODY = {"prompt": "The capital of France is", "max_tokens": 2, "ignore_eos": True, "temperature": 0}


class InProcessServer:
    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.port = free_port()
        self.app = create_app(EngineConfig(engram=str(ckpt), table_placement="mmap", max_model_len=64,
                                           max_num_seqs=2, prefetch=True),  # a worker to stop, on any cores
                              ServerConfig(port=self.port, engine_iteration_timeout=ITERATION_TIMEOUT))
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None))
        self.thread = threading.Thread(target=self.uvicorn.run, name="test-uvicorn", daemon=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    @property
    def engine(self):
        return self.app.state.client.engine

    def wait_health(self, status: int, timeout: float = 20.0) -> httpx.Response:
        """/health once it answers `status` (it is polled, as an orchestrator would)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.http.get("/health")
                if r.status_code == status or time.monotonic() > deadline:
                    return r
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def srv(engram_ckpt, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("mmap") / "ckpt"
    shutil.copytree(engram_ckpt, ckpt)
    s = InProcessServer(ckpt)
    s.thread.start()
    assert s.wait_health(200, timeout=600).json() == {"status": "ready"}
    yield s
    s.http.close()
    s.uvicorn.should_exit = True
    s.thread.join(120)
    assert not s.thread.is_alive(), "the in-process server did not stop"


def _prefetcher(srv) -> Prefetcher:
    return next(b for b in srv.engine.engram.backends if isinstance(b, Prefetcher))


def _assert_live(srv) -> None:
    r = srv.http.get("/live")
    assert r.status_code == 200 and r.json() == {"status": "alive"}


def test_ready_and_live(srv):
    _assert_live(srv)
    r = srv.http.post("/v1/completions", json=BODY)
    assert r.status_code == 200, r.text
    assert srv.http.get("/health").json() == {"status": "ready"}


def test_stuck_step_turns_readiness_503_until_steps_resume(srv, monkeypatch):
    release = threading.Event()
    forward = srv.engine.runner.forward

    def stuck(*args, **kwargs):
        release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(srv.engine.runner, "forward", stuck)
    result = {}
    client = threading.Thread(target=lambda: result.update(r=srv.http.post("/v1/completions", json=BODY)))
    client.start()
    try:
        time.sleep(0.5)
        assert srv.http.get("/health").status_code == 200  # a step may take a while before it counts as stuck
        r = srv.wait_health(503)
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "unhealthy" and "no engine step has finished" in r.json()["reason"]
        _assert_live(srv)
    finally:
        release.set()
        client.join(60)
    assert result["r"].status_code == 200
    assert srv.wait_health(200).json() == {"status": "ready"}


def test_stopped_prefetch_worker_turns_readiness_503(srv):
    prefetcher = _prefetcher(srv)
    assert prefetcher.worker_alive
    prefetcher._queue.put(None)  # the worker's stop sentinel: its thread ends as a crashed one would
    prefetcher._worker.join(10)
    try:
        r = srv.wait_health(503)
        assert r.status_code == 503 and r.json() == {"status": "unhealthy",
                                                     "reason": "the Engram prefetch worker has stopped"}
        failed = srv.http.post("/v1/completions", json=BODY)  # its rows never come: the step fails
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
        _assert_live(srv)
    finally:  # a worker again, for the tests after this one
        prefetcher._worker = threading.Thread(target=prefetcher._run, name="engram-prefetch", daemon=True)
        prefetcher._worker.start()
    assert srv.wait_health(200).json() == {"status": "ready"}
    assert srv.http.post("/v1/completions", json=BODY).status_code == 200


def _table_file(ckpt: Path, layer: str) -> Path:
    return ckpt / json.loads((ckpt / "engram.json").read_text())["tables"][layer]["file"]


def _assert_no_server_detail(text: str, ckpt: Path) -> None:
    for detail in (str(ckpt), "/", "safetensors", "Traceback", "Error"):
        assert detail not in text, text


def test_truncated_table_answers_500_with_request_id_and_readiness_503(srv, caplog):
    table = _table_file(srv.ckpt, "15")
    # Nothing may be reading the mapping when it shrinks (a read past the end is a SIGBUS): a
    # request served to the end leaves no gather in flight, stale tickets of earlier tests included.
    assert srv.http.post("/v1/completions", json=BODY).status_code == 200
    os.truncate(table, table.stat().st_size // 2)

    r = srv.wait_health(503)
    assert r.status_code == 503 and r.json()["status"] == "unhealthy"
    assert "layer 15" in r.json()["reason"] and "unreadable" in r.json()["reason"]
    _assert_no_server_detail(r.json()["reason"], srv.ckpt)

    with caplog.at_level(logging.ERROR, logger="engram_serve"):
        r = srv.http.post("/v1/completions", json=BODY, headers={"X-Request-Id": "trunc-1"})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "internal_error" and err["code"] == "engine_error"
        assert r.headers["x-request-id"] == "trunc-1" and "trunc-1" in err["message"]
        _assert_no_server_detail(err["message"], srv.ckpt)

        with srv.http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}) as s:
            assert s.status_code == 200
            rid = s.headers["x-request-id"]
            events = [line for line in s.iter_lines() if line]
        error = json.loads(next(e for e in events if '"error"' in e).removeprefix("data: "))["error"]
        assert events[-1] == "data: [DONE]" and error["code"] == "engine_error" and rid in error["message"]
        _assert_no_server_detail(error["message"], srv.ckpt)

    logged = [rec.getMessage() for rec in caplog.records if rec.name == "engram_serve"]
    assert any("trunc-1" in m and str(table) in m for m in logged), logged  # the detail, with the same id
    assert any(rid in m and str(table) in m for m in logged), logged
    _assert_live(srv)
    assert srv.http.get("/health").status_code == 503


def test_bug_answers_generic_500_with_request_id(srv, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError(f"[Errno 5] cannot read {srv.ckpt}/tokenizer.json")

    monkeypatch.setattr(srv.engine.tokenizer, "encode", broken)
    with caplog.at_level(logging.ERROR, logger="engram_serve"):
        r = srv.http.post("/v1/completions", json=BODY)
    rid = r.headers["x-request-id"]  # set by the bug handler itself: Starlette runs it outside the middleware
    err = r.json()["error"]
    assert r.status_code == 500 and err["type"] == "internal_error" and rid in err["message"]
    _assert_no_server_detail(err["message"], srv.ckpt)
    bug = next(rec for rec in caplog.records if rid in rec.getMessage())
    assert bug.exc_info and str(srv.ckpt) in str(bug.exc_info[1])  # the log has the traceback, with the same id


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_loop_turns_readiness_503(srv, monkeypatch):
    def crash():
        raise RuntimeError("injected: the engine loop dies")

    monkeypatch.setattr(srv.engine, "_drain_inbox", crash)
    srv.engine.abort("nothing")  # wakes the loop, which dies at once
    r = srv.wait_health(503)
    assert r.json() == {"status": "unhealthy", "reason": "the engine loop has stopped"}  # before the table's reason
    _assert_live(srv)
