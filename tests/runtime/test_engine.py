"""The engine as the server drives it: another thread, streaming, abort, bad input."""
from __future__ import annotations

import queue
import threading

import pytest

from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.sampling import SamplingParams

TIMEOUT = 120


@pytest.fixture(scope="module")
def engine(loaded_model):
    eng = LLMEngine.launch(EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=256), loaded_model)
    yield eng
    eng.shutdown()


def submit(engine, ids, params, request_id=None):
    q: queue.Queue = queue.Queue()
    rid = engine.add_request(ids, params, q.put, request_id)
    return rid, q


def drain(q):
    outs = []
    while True:
        o = q.get(timeout=TIMEOUT)
        outs.append(o)
        if o.finished:
            return outs


def test_streams_from_another_thread(engine, tokenizer, prompt_ids):
    results = {}

    def client():
        _, q = submit(engine, prompt_ids[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        results["outs"] = drain(q)
        results["thread"] = threading.current_thread().name

    t = threading.Thread(target=client)
    t.start()
    t.join(TIMEOUT)
    outs = results["outs"]
    assert len(outs) == 10 and all(len(o.new_token_ids) == 1 for o in outs)  # one delta per step
    ids = [t for o in outs for t in o.new_token_ids]
    assert "".join(o.new_text for o in outs) == tokenizer.decode(ids, skip_special_tokens=True)
    last = outs[-1]
    assert last.finish_reason == "length" and last.num_output_tokens == 10
    assert last.num_prompt_tokens == len(prompt_ids[1])
    assert last.arrival_time <= last.first_scheduled_time <= last.first_token_time


def test_abort_frees_kv(engine, prompt_ids):
    rid, q = submit(engine, prompt_ids[3], SamplingParams(max_tokens=100, ignore_eos=True, seed=1))
    first = q.get(timeout=TIMEOUT)
    assert not first.finished
    engine.abort(rid)
    outs = drain(q)
    assert outs[-1].finish_reason == "abort" and outs[-1].num_output_tokens < 100
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    assert sorted(engine.scheduler._free_slots) == list(range(4))


def test_bad_input_is_refused_and_engine_keeps_serving(engine, prompt_ids):
    with pytest.raises(ValueError, match="context window"):
        engine.add_request(list(range(5, 5 + 128)), SamplingParams(), print)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    params = SamplingParams()
    params.max_tokens = -3
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        engine.add_request(prompt_ids[0], params, print)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(), print)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([10**6], SamplingParams(), print)
    _, q = submit(engine, prompt_ids[0], SamplingParams(max_tokens=3, ignore_eos=True))
    assert drain(q)[-1].num_output_tokens == 3


def test_error_in_one_request_does_not_stop_the_others(engine, prompt_ids):
    broken = SamplingParams(max_tokens=20, temperature=0, stop=["never"])
    _, qb = submit(engine, prompt_ids[1], broken)
    broken.stop = [None]  # corrupt after validation: the stop check raises inside the engine
    _, qg = submit(engine, prompt_ids[2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    bad = drain(qb)[-1]
    assert bad.finish_reason == "error" and "TypeError" in bad.error
    good = drain(qg)[-1]
    assert good.finish_reason == "length" and good.num_output_tokens == 20


def test_callback_failure_aborts_only_that_request(engine, prompt_ids):
    def explode(_out):
        raise RuntimeError("client went away")

    engine.add_request(prompt_ids[0], SamplingParams(max_tokens=50, ignore_eos=True), explode)
    _, q = submit(engine, prompt_ids[1], SamplingParams(max_tokens=5, ignore_eos=True))
    assert drain(q)[-1].num_output_tokens == 5
    assert engine.stats().num_running == 0


def test_max_tokens_zero_and_duplicate_ids(engine, prompt_ids):
    _, q = submit(engine, prompt_ids[0], SamplingParams(max_tokens=0), request_id="fixed")
    out = drain(q)
    assert len(out) == 1 and out[0].finish_reason == "length" and out[0].new_token_ids == []
    submit(engine, prompt_ids[0], SamplingParams(max_tokens=30, ignore_eos=True), request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompt_ids[0], SamplingParams(), print, "dup")
    engine.abort("dup")


def test_more_requests_than_slots_all_finish(engine, prompt_ids):
    queues = [submit(engine, prompt_ids[i % 4], SamplingParams(max_tokens=6, ignore_eos=True, seed=i))[1]
              for i in range(10)]
    assert all(drain(q)[-1].num_output_tokens == 6 for q in queues)


def test_shutdown_aborts_in_flight(loaded_model, prompt_ids):
    eng = LLMEngine.launch(EngineConfig(max_num_seqs=2, max_model_len=64), loaded_model)
    _, q = submit(eng, prompt_ids[0], SamplingParams(max_tokens=60, ignore_eos=True))
    q.get(timeout=TIMEOUT)
    eng.shutdown()
    assert drain(q)[-1].finish_reason == "abort"


def test_launch_builds_the_engine_on_the_thread_that_steps_it(loaded_model, prompt_ids, monkeypatch):
    """One thread for all of the engine's compute: its OpenMP pool is then the only one (see launch)."""
    threads = {}
    build = LLMEngine._runner
    step = LLMEngine.step

    def record(key, fn):
        def wrapped(self, *a, **kw):
            threads[key] = threading.current_thread().name
            return fn(self, *a, **kw)
        return wrapped

    monkeypatch.setattr(LLMEngine, "_runner", record("build", build))
    monkeypatch.setattr(LLMEngine, "step", record("step", step))
    eng = LLMEngine.launch(EngineConfig(max_num_seqs=2, max_model_len=64), loaded_model)
    try:
        drain(submit(eng, prompt_ids[0], SamplingParams(max_tokens=2, ignore_eos=True))[1])
    finally:
        eng.shutdown()
    assert threads == {"build": "engram-engine", "step": "engram-engine"}


def test_launch_reraises_what_the_build_raised(loaded_model):
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLMEngine.launch(EngineConfig(max_num_seqs=0), loaded_model)
