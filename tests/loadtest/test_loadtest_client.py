"""The streaming client's parsing of SSE bodies, served by httpx's MockTransport."""
from __future__ import annotations

import asyncio
import json

import httpx

from loadtest.client import RequestSettings, send_request
from loadtest.workload import SampleRequest


def _sse(*objs, done: bool = True) -> bytes:
    frames = [f"data: {json.dumps(o)}\n\n" for o in objs] + (["data: [DONE]\n\n"] if done else [])
    return "".join(frames).encode()


def _send(status: int, body: bytes, ignore_eos: bool = True):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, "http://x", SampleRequest([5, 6, 7], 3, 3),
                                      RequestSettings(model="m", ignore_eos=ignore_eos))

    return asyncio.run(go()), seen["body"]


def _choice(text):
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def test_chunks_with_empty_text_are_tokens_and_usage_gives_counts():
    body = _sse(_choice(""), _choice(" a"), _choice(" b"),
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    res, sent = _send(200, body)
    assert res.success and res.error == ""
    assert res.output_tokens == 3 and res.prompt_len == 3 and res.usage_reported
    assert len(res.itl) == 2 and res.ttft > 0 and res.latency >= res.ttft
    assert res.generated_text == " a b"
    assert sent["ignore_eos"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["prompt"] == [5, 6, 7] and sent["max_tokens"] == 3 and sent["stream"] is True


def test_without_usage_chunks_are_counted():
    res, sent = _send(200, _sse(_choice("x"), _choice("y")), ignore_eos=False)
    assert res.success and res.output_tokens == 2 and not res.usage_reported
    assert "ignore_eos" not in sent


def test_failures_are_recorded_not_raised():
    res, _ = _send(400, json.dumps({"error": {"message": "prompt too long", "type": "x"}}).encode())
    assert not res.success and res.error == "HTTP 400: prompt too long"
    res, _ = _send(200, _sse(_choice("x"), done=False))
    assert not res.success and res.error == "stream ended without [DONE]"
    res, _ = _send(200, _sse({"error": {"message": "engine died"}}))
    assert not res.success and "engine died" in res.error
    res, _ = _send(200, b"data: {not json\n\n")
    assert not res.success and res.error.startswith("JSONDecodeError")


def test_unicode_line_breaks_inside_generated_text_do_not_split_events():
    """A server may send U+2028, U+2029 or U+0085 raw inside a JSON string (ours escapes
    them, others need not); SSE lines end at LF only, so the event stays whole."""
    frames = [f"data: {json.dumps(_choice(t), ensure_ascii=False)}\r\n\r\n" for t in ("a\u2028b", "c\x85", "\u2029")]
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    body = ("".join(frames) + f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n").encode()
    res, _ = _send(200, body)
    assert res.success and res.generated_text == "a\u2028bc\x85\u2029" and res.output_tokens == 3
