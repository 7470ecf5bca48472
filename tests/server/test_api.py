"""The OpenAI-compatible API against a real server, with the official `openai` client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import math
import time

import httpx
import openai
import pytest

from server_metrics import metric, scrape

API_KEY = "test-key-123"  # as in conftest.py
ENGRAM_LAYERS = [1, 15]
MAX_MODEL_LEN = 96

PROMPT = "The capital of France is"
IDS = [504, 3575, 282, 4649, 314]  # any valid token ids; counts are what matter


def greedy(oai, model, prompt=PROMPT, max_tokens=8, **kw):
    return oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_models_health_version(http, model_name, server):
    assert server.health_seen == [(503, "loading"), (200, "ready")]  # listening while the model loads
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN and card["engram_layers"] == ENGRAM_LAYERS
    assert http.get("/health").json() == {"status": "ready"}
    version = http.get("/version").json()
    assert version["model"] == model_name and version["engram_layers"] == ENGRAM_LAYERS and version["version"]


def test_completion_stream_equals_non_stream(oai, model_name):
    full = greedy(oai, model_name, extra_body={"ignore_eos": True})
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(greedy(oai, model_name, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_equals_non_stream(oai, model_name):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    full = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert 1 <= full.usage.completion_tokens <= 6 and full.choices[0].message.content
    stream = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 20  # the template's system text


def test_prompt_forms_and_n(oai, model_name):
    r = oai.completions.create(model=model_name, prompt=["Hello", "One two three"], n=2, max_tokens=3,
                               temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    single = [oai.completions.create(model=model_name, prompt=p, max_tokens=1).usage.prompt_tokens
              for p in ("Hello", "One two three")]
    assert r.usage.prompt_tokens == sum(single)
    ids = oai.completions.create(model=model_name, prompt=IDS, max_tokens=2, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == len(IDS) and ids.usage.completion_tokens == 2
    lists = oai.completions.create(model=model_name, prompt=[IDS, IDS[:2]], max_tokens=2, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert lists.usage.prompt_tokens == len(IDS) + 2 and len(lists.choices) == 2
    assert lists.choices[0].text == greedy(oai, model_name, prompt=IDS, max_tokens=2,
                                           extra_body={"ignore_eos": True}).choices[0].text


def test_echo(oai, model_name):
    r = greedy(oai, model_name, max_tokens=3, echo=True)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)
    chunks = list(greedy(oai, model_name, max_tokens=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_logprobs(oai, model_name):
    r = greedy(oai, model_name, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert math.isclose(max(top.values()), value, abs_tol=1e-4)  # greedy picks the most likely
    chat = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_stop_and_seed_and_top_k(oai, model_name):
    text = greedy(oai, model_name, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = greedy(oai, model_name, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].text)
    assert stop not in cut.choices[0].text and len(cut.choices[0].text) <= text.index(stop)
    sample = [oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=s,
                                     extra_body={"ignore_eos": True}).choices[0].text for s in (7, 7, 8)]
    assert sample[0] == sample[1] and sample[0] != sample[2]
    top1 = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.0,
                                  extra_body={"top_k": 1, "ignore_eos": True})
    assert top1.choices[0].text == greedy(oai, model_name, max_tokens=6,
                                          extra_body={"ignore_eos": True}).choices[0].text


def test_engram_gates(http):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "engram_gates": True}
    r = http.post("/v1/completions", json=body).json()
    gates = r["choices"][0]["engram_gates"]
    assert len(gates) == 4 and "".join(g["token"] for g in gates) == r["choices"][0]["text"]
    for g in gates:
        assert sorted(map(int, g["gates"])) == ENGRAM_LAYERS and all(0.0 <= v <= 1.0 for v in g["gates"].values())
    streamed = []
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True,
            "stream": True, "engram_gates": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += choice.get("engram_gates") or []
    assert len(streamed) == 3
    assert "engram_gates" not in http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["choices"][0]


def test_sixteen_concurrent_requests(oai, model_name):
    def one(i):
        return oai.completions.create(model=model_name, prompt=IDS[: 1 + i % 5], max_tokens=4 + i % 3,
                                      extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, r in enumerate(results):
        assert r.usage.prompt_tokens == 1 + i % 5 and r.usage.completion_tokens == 4 + i % 3
        assert r.choices[0].finish_reason == "length"


def _wait_idle(http) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while True:
        values = scrape(http)
        if metric(values, "engram_serve_num_requests_running") == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def _check_aborted(before, after, max_tokens):
    assert metric(after, "engram_serve_num_requests_running") == 0
    assert metric(after, "engram_serve_kv_cache_usage_perc") == 0
    aborted = metric(after, "engram_serve_request_success_total", finished_reason="abort")
    assert aborted == metric(before, "engram_serve_request_success_total", finished_reason="abort") + 1
    generated = metric(after, "engram_serve_generation_tokens_total") - \
        metric(before, "engram_serve_generation_tokens_total")
    assert 1 <= generated < max_tokens


def test_disconnect_mid_stream_aborts(http, server):
    before = scrape(http)
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 80, "stream": True,
                                                       "ignore_eos": True}) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: {") for line in got)
            assert metric(scrape(http), "engram_serve_num_requests_running") == 1
    _check_aborted(before, _wait_idle(http), 80)


def test_disconnect_while_waiting_for_a_non_streaming_answer_aborts(http, server):
    before = scrape(http)
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 85, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=0.4))
    _check_aborted(before, _wait_idle(http), 85)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None),
    ({"max_tokens": 1}, "prompt"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "prompt"),
    ({"prompt": "word " * (MAX_MODEL_LEN + 5)}, "prompt"),
])
def test_400_invalid_fields(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"].split(".")[0] == param


CHAT = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("route, body, fields", [
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL], "tool_choice": "auto"}, ["tools", "tool_choice"]),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, ["response_format"]),
    ("/v1/chat/completions", {"messages": CHAT, "functions": [TOOL["function"]], "parallel_tool_calls": False},
     ["functions", "parallel_tool_calls"]),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"50256": -100}}, ["logit_bias"]),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.2, "guided_regex": "a+"},
     ["repetition_penalty", "guided_regex"]),
])
def test_400_unsupported_fields(http, route, body, fields):
    r = http.post(route, json={**body, "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] in fields
    assert all(f"{field}: not supported" in err["message"] for field in fields), err["message"]


def test_unsupported_fields_at_neutral_values_are_served(http):
    r = http.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 1, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "frequency_penalty": 0, "logit_bias": {}, "user": "u", "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text


def test_request_id_header(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and r.json()["id"] == f"cmpl-{rid}"

    def chat(_):
        return http.post("/v1/chat/completions", headers={"X-Request-Id": "client-42"},
                         json={"messages": CHAT, "max_tokens": 2})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # an incoming id is honoured, even twice at once
        same = list(pool.map(chat, range(2)))
    assert [(x.status_code, x.headers["x-request-id"], x.json()["id"]) for x in same] == \
        [(200, "client-42", "chatcmpl-client-42")] * 2
    bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}, headers={"X-Request-Id": "a b"})
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32  # not a usable id: one of ours
    assert http.get("/health").headers["x-request-id"]


def test_400_chat(http):
    too_long = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * MAX_MODEL_LEN}]})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    bad_role = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"].startswith("messages")
    assert http.post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_404_401(http, oai, server):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="x", prompt="x", max_tokens=1)
    anonymous = httpx.post(server.url("/v1/completions"), json={"prompt": "x"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url("/health")).status_code == 200  # ops routes stay open
