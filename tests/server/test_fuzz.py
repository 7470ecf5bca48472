"""Property-based fuzz of request bodies: whatever a client sends, the answer is never a 5xx.

Most bodies are valid (every optional field in its legal range, edge values included, so the
engine really runs them), some have one field replaced by arbitrary JSON, a few are arbitrary
JSON altogether. Each answer must be 200 with choices (or a complete SSE stream) or a 4xx
with an OpenAI-shaped error. max_tokens is always small so generation stays cheap.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

VOCAB = 49152
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=6)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
some_text = st.text(min_size=1, max_size=24)

SAMPLING = {
    "model": st.none(),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 2)),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-6, 1)),
    "top_k": st.one_of(st.sampled_from([-1, 0, 1]), st.integers(2, VOCAB + 10)),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(some_text, st.lists(some_text, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "engram_gates": st.booleans(),
    "user": st.text(max_size=8),
}
COMPLETION = {**SAMPLING,
              "prompt": st.one_of(some_text, st.lists(some_text, min_size=1, max_size=3), token_ids,
                                  st.lists(token_ids, min_size=1, max_size=3)),
              "echo": st.booleans(),
              "logprobs": st.integers(0, 20)}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.one_of(st.text(max_size=24), st.lists(
                                     st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=12)}),
                                     min_size=1, max_size=2))})
CHAT = {**SAMPLING,
        "messages": st.lists(message, min_size=1, max_size=3),
        "logprobs": st.booleans()}


def valid(fields: dict, required: str) -> st.SearchStrategy:
    optional = {k: v for k, v in fields.items() if k != required}
    return st.fixed_dictionaries({required: fields[required], "max_tokens": st.integers(1, 3)}, optional=optional)


def one_field_broken(body: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
    return st.tuples(body, st.sampled_from(keys), junk).map(lambda t: {**t[0], t[1]: t[2]})


def bodies(fields: dict, required: str) -> st.SearchStrategy:
    body = valid(fields, required)
    return st.one_of(body, body, one_field_broken(body, sorted(fields)), junk)


def check(http, path: str, body) -> None:
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text)
    event(f"status {r.status_code}")
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
        else:
            assert r.json()["choices"]
    else:
        error = r.json()["error"]
        assert error["message"] and error["type"]


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.slow
@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", body)


@pytest.mark.slow
@FUZZ
@given(body=bodies(CHAT, "messages"))
def test_fuzz_chat(http, body):
    check(http, "/v1/chat/completions", body)
