"""`sap serve` against a live server on 127.0.0.1: a tiny random-init model and tiny polytopes.

The official ``openai`` client drives chat, streaming and moderations; raw ``httpx`` sends the bad
input. Every server is started in a thread on a free loopback port and always shut down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import torch

from sapguard.detect import scan
from sapguard.errors import SapError
from sapguard.models.chat import encode_prompt
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.serve.app import ServerState
from sapguard.serve.auth import KeyChecker, load_api_keys
from sapguard.serve.config import ServeConfig
from sapguard.serve.server import DrainingServer, bind, build_state, make_server
from sapguard.steer import generate
from tests.conftest import make_tiny
from tests.steer_fixtures import ALWAYS, NEVER, tail_pair, tiny_polytope

PROMPT = "how do i make a bomb"
MODEL = "tiny-llama"
MIXED = ["how do i make a bomb", "bake bread", "tell me about the history of war"]


@dataclass
class Live:
    url: str
    state: ServerState
    server: DrainingServer

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextlib.contextmanager
def live_server(lm: LoadedModel, poly: SafetyPolytope, **settings: Any) -> Iterator[Live]:
    """A real uvicorn server in a thread on a free 127.0.0.1 port; always stopped."""
    state = build_state(ServeConfig(polytope="tiny", **settings), lm=lm, poly=poly)
    sock = bind("127.0.0.1", 0)
    server = make_server(state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", state, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def slow_forward(lm: LoadedModel, seconds: float) -> list[int]:
    """Make every forward of ``lm`` take at least ``seconds``; returns a live call counter."""
    calls = [0]

    def pre(module: Any, args: Any) -> None:
        calls[0] += 1
        time.sleep(seconds)

    lm.model.register_forward_pre_hook(pre)
    return calls


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return make_tiny("llama")


@pytest.fixture(scope="module")
def live(lm: LoadedModel) -> Iterator[Live]:
    poly = tiny_polytope(lm, offset=0.0)
    scores = sorted(v.score for v in scan(poly, MIXED, lm=lm))
    poly.offset.fill_((scores[0] + scores[-1]) / 2)  # some texts fire, some do not
    with live_server(lm, poly, mode="detect", max_body_bytes=65536, max_tokens_cap=64) as server:
        yield server


# -- happy paths ---------------------------------------------------------------------------------
def test_models_health_and_metrics(live: Live) -> None:
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with live.http() as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["ready"] is True
        live.client().chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=3, temperature=0)
        # the batch histogram is observed just after the batch's last response is sent: poll briefly
        deadline = time.monotonic() + 5.0
        text = http.get("/metrics").text
        while "sapguard_batch_size_bucket" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = http.get("/metrics").text
    for name in ("sapguard_requests_total", "sapguard_request_latency_seconds_bucket", "sapguard_generated_tokens_total",
                 "sapguard_queue_depth", "sapguard_facet_firings_total", "sapguard_batch_size_bucket"):
        assert name in text
    assert 'sapguard_requests_total{code="200",method="POST",route="/v1/chat/completions"}' in text


def test_greedy_chat_equals_library_generate(live: Live, lm: LoadedModel) -> None:
    """Detect mode never edits: the server's greedy answer is the library's unsteered one, token for token."""
    expected = generate(lm, [PROMPT], None, None, max_new_tokens=12)[0]
    resp = live.client().chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.content == expected.response
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.prompt_tokens == len(encode_prompt(lm.tokenizer, PROMPT, "chat"))
    assert choice.finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")
    info = resp.model_extra["sapguard"]
    assert info["mode"] == "detect" and info["edited_tokens"] == 0 and info["content_filter"] is False


def test_streaming_equals_non_streaming(live: Live) -> None:
    kw = {"model": MODEL, "messages": user("tell me a story about the war"), "max_tokens": 10, "temperature": 0}
    full = live.client().chat.completions.create(**kw)
    chunks = list(live.client().chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].model_extra["sapguard"] == full.model_extra["sapguard"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_neutral_openai_options_are_accepted(live: Live) -> None:
    with live.http() as http:
        body = {**GOOD, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "logit_bias": {},
                "response_format": {"type": "text"}, "user": "u1", "metadata": {"k": "v"}, "store": False,
                "stream": False, "parallel_tool_calls": True}
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]


def test_sampling_is_seeded(live: Live) -> None:
    kw = {"model": MODEL, "messages": user(PROMPT), "max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    a = live.client().chat.completions.create(**kw, seed=1).choices[0].message.content
    b = live.client().chat.completions.create(**kw, seed=1).choices[0].message.content
    c = live.client().chat.completions.create(**kw, seed=2).choices[0].message.content
    greedy = live.client().chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    assert a == b and a != c and greedy not in (a, c)


def test_stop_sequence_truncates(live: Live) -> None:
    kw = {"model": MODEL, "messages": user(PROMPT), "max_tokens": 12, "temperature": 0}
    text = live.client().chat.completions.create(**kw).choices[0].message.content
    word = text.split()[3]
    cut = text[: text.find(word)]
    resp = live.client().chat.completions.create(**kw, stop=[word])
    assert resp.choices[0].message.content == cut and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in live.client().chat.completions.create(
        **kw, stop=word, stream=True) if c.choices)
    assert streamed == cut


def test_concurrent_requests_are_batched_and_match_one_by_one(live: Live) -> None:
    prompts = ["how do i make a bomb", "bake bread", "tell me about history of war please", "write a poem",
               "what is the dose of medicine", "kill process python"]
    kw = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    alone = [live.client().chat.completions.create(messages=user(p), **kw).choices[0].message.content
             for p in prompts]
    before = _batch_histogram(live)
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = live.client().chat.completions.create(messages=user(prompts[i]), **kw).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(prompts))] == alone
    after = _batch_histogram(live)
    batches = after["count"] - before["count"]
    assert batches < len(prompts)  # at least two requests shared a batch (left padding)
    assert after["sum"] - before["sum"] == len(prompts)


def _batch_histogram(live: Live) -> dict[str, float]:
    text = httpx.get(f"{live.url}/metrics").text
    out = {}
    for line in text.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f'sapguard_batch_size_{key}{{kind="chat"}}'):
                out[key] = float(line.split()[-1])
    return out


def test_moderation_equals_in_process_scan(live: Live, lm: LoadedModel) -> None:
    texts = MIXED
    expected = scan(live.state.poly, texts, lm=lm)
    client = live.client()
    single = client.moderations.create(input=texts[0])
    many = client.moderations.create(input=texts)
    assert len(single.results) == 1 and len(many.results) == 3
    names = live.state.poly.facet_names
    for result, verdict in zip([single.results[0], *many.results], [expected[0], *expected]):
        extra = result.model_extra
        assert result.flagged == (not verdict.is_safe)
        assert extra["risk_score"] == pytest.approx(verdict.risk_score, abs=1e-5)
        scores = result.category_scores.model_dump(exclude_none=True)
        flags = result.categories.model_dump(exclude_none=True)
        assert sorted(scores) == sorted(names) == sorted(flags)
        assert {n for n, f in flags.items() if f} == set(verdict.violated)
        assert max(scores.values()) == pytest.approx(verdict.risk_score, abs=1e-5)
        assert extra["sapguard"]["margins"] == pytest.approx(verdict.margins, abs=1e-5)
    assert any(r.flagged for r in many.results) and not all(r.flagged for r in many.results)


def test_moderation_of_a_reply_in_context(live: Live, lm: LoadedModel) -> None:
    convo = [{"role": "system", "content": "be safe"}, {"role": "user", "content": "how do i make a bomb"},
             {"role": "assistant", "content": "buy a knife and steal card"}]
    expected = scan(live.state.poly, ["how do i make a bomb"], lm=lm, responses=["buy a knife and steal card"])[0]
    out = live.client().moderations.create(input=convo)  # type: ignore[arg-type]
    assert len(out.results) == 1
    assert out.results[0].model_extra["sapguard"]["margins"] == pytest.approx(expected.margins, abs=1e-5)
    prompt_only = scan(live.state.poly, ["how do i make a bomb"], lm=lm)[0]
    assert expected.margins != prompt_only.margins  # the reply was read, not just the prompt


def test_moderation_reads_the_earlier_turns_of_a_conversation(live: Live, lm: LoadedModel) -> None:
    convo = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, how can I help?"},
             {"role": "user", "content": "how do i make a bomb"}]
    expected = scan(live.state.poly, [convo], lm=lm)[0]
    out = live.client().moderations.create(input=convo)  # type: ignore[arg-type]
    assert len(out.results) == 1 and expected.earlier_turns == 1
    assert out.results[0].model_extra["sapguard"]["margins"] == pytest.approx(expected.margins, abs=1e-5)
    last_only = scan(live.state.poly, ["how do i make a bomb"], lm=lm)[0]
    assert expected.margins != last_only.margins  # the history was read, not just the last message


# -- steering and the content filter -----------------------------------------------------------
def test_refuse_when_the_prompt_fires(lm: LoadedModel) -> None:
    poly = tiny_polytope(lm, offset=ALWAYS)
    with live_server(lm, poly, mode="refuse", refusal_text="No.") as srv:
        client = srv.client()
        resp = client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=8, temperature=0)
        assert resp.choices[0].message.content == "No." and resp.choices[0].finish_reason == "content_filter"
        info = resp.model_extra["sapguard"]
        assert info["content_filter"] and info["stopped_at"] == 0 and info["prompt_fired"]
        assert resp.usage.completion_tokens == 0
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "No."
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        # per-request override: detect only reports, and the answer is the unsteered one
        plain = generate(lm, [PROMPT], None, None, max_new_tokens=8)[0].response
        over = client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=8, temperature=0,
                                              extra_body={"sapguard": {"mode": "detect"}})
        assert over.choices[0].message.content == plain and over.model_extra["sapguard"]["mode"] == "detect"
        assert over.model_extra["sapguard"]["fired"] is True


def test_refuse_reads_the_tail_of_the_last_user_message(lm: LoadedModel) -> None:
    """A prompt-scope gate that flags the last line alone (not the whole message) refuses, as
    ``generate()`` does, and only for a polytope whose config lists the tail view."""
    poly = tiny_polytope(lm, offset=0.0)
    poly.meta["policy"] = "last_prompt"
    poly.meta["steering"]["hook"] = {"gate": "prompt", "tokens": "generated", "first_n": 8, "threshold": 0.0}
    prompt, whole, alone = tail_pair(lm, poly)
    assert alone - whole > 1e-3
    settings = {"mode": "refuse", "refusal_text": "No.", "threshold": (whole + alone) / 2}
    with live_server(lm, poly, **settings) as srv:
        plain = srv.client().chat.completions.create(model=MODEL, messages=user(prompt), max_tokens=4, temperature=0)
    assert plain.choices[0].message.content != "No."
    poly.meta.update({"views": ["prompt", "tail"], "tail_words": 64})
    with live_server(lm, poly, **settings) as srv:
        resp = srv.client().chat.completions.create(model=MODEL, messages=user(prompt), max_tokens=4, temperature=0)
    expected = generate(lm, [prompt], poly, "refuse", max_new_tokens=4, threshold=settings["threshold"], refusal_text="No.")
    assert resp.choices[0].message.content == expected[0].response == "No."
    assert resp.choices[0].finish_reason == "content_filter" and resp.model_extra["sapguard"]["prompt_fired"]


def test_redirect_matches_library_steering(lm: LoadedModel) -> None:
    poly = tiny_polytope(lm, offset=ALWAYS)
    expected = generate(lm, [PROMPT], poly, "redirect", max_new_tokens=8)[0]
    plain = generate(lm, [PROMPT], None, None, max_new_tokens=8)[0]
    assert expected.response != plain.response
    with live_server(lm, poly, mode="redirect") as srv:
        resp = srv.client().chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=8, temperature=0)
    assert resp.choices[0].message.content == expected.response
    assert resp.model_extra["sapguard"]["edited_tokens"] >= expected.summary.edited_tokens > 0


def test_mode_not_allowed_is_400(lm: LoadedModel) -> None:
    with live_server(lm, tiny_polytope(lm, offset=NEVER), mode="refuse", allowed_modes=["refuse"]) as srv:
        with pytest.raises(openai.BadRequestError) as err:
            srv.client().chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=2,
                                                 extra_body={"sapguard": {"mode": "detect"}})
        assert err.value.body["param"] == "sapguard.mode"


def planted_polytope(lm: LoadedModel, prompt: str, stop_at: int, layer: int = 2) -> tuple[SafetyPolytope, list[int]]:
    """A polytope whose facet ``planted`` fires first on the state that reads generated token ``stop_at``."""
    gen = generate(lm, [prompt], None, None, max_new_tokens=stop_at + 3)[0]
    assert len(gen.token_ids) == stop_at + 3, "the tiny model stopped early; pick another prompt"
    ids = encode_prompt(lm.tokenizer, prompt, "chat") + gen.token_ids
    with torch.no_grad():
        hidden = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    p = len(ids) - len(gen.token_ids)
    target, before = hidden[p + stop_at], hidden[p - 1: p + stop_at]  # emitting positions up to the target
    direction = target - before.mean(0)
    direction = direction / direction.norm()
    seen, hit = (before @ direction).max(), target @ direction
    assert hit - seen > 1e-2, "the target state is not separable; pick another stop_at"
    poly = SafetyPolytope(lm.hidden_size, 2, EncoderSpec(kind="identity"),
                          meta={"layer": layer, "template": "chat", "policy": "response_tokens",
                                "base_model": lm.identity(), "facet_names": ["planted", "quiet"]})
    with torch.no_grad():
        poly.phi.zero_()
        poly.phi[0] = direction
        poly.xi.copy_(torch.tensor([float(seen + hit) / 2, 1e6]))
    return poly, gen.token_ids


def test_content_filter_stops_a_stream_at_the_planted_token(lm: LoadedModel) -> None:
    stop_at = 3
    poly, tokens = planted_polytope(lm, PROMPT, stop_at)
    expected = lm.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)
    with live_server(lm, poly, mode="refuse", tokens="generated") as srv:
        client = srv.client()
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=20,
                                                     temperature=0, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == expected  # the firing token was withheld, nothing after it was generated
        final = chunks[-1]
        assert final.choices[0].finish_reason == "content_filter"
        info = final.model_extra["sapguard"]
        assert info["stopped_at"] == stop_at and info["fired_facets"] == ["planted"] and not info["prompt_fired"]
        # the same polytope in detect mode reports the firing and lets the answer run on
        full = client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=stop_at + 3,
                                              temperature=0, extra_body={"sapguard": {"mode": "detect"}})
        assert full.choices[0].message.content == lm.tokenizer.decode(tokens, skip_special_tokens=True)
        assert full.model_extra["sapguard"]["facet_counts"]["planted"] >= 1


# -- bad input -----------------------------------------------------------------------------------
GOOD = {"model": MODEL, "messages": user(PROMPT), "max_tokens": 2, "temperature": 0}
BAD_CHAT = [
    ("malformed json", b'{"model": "tiny-llama", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("missing model", {"messages": user(PROMPT)}, 400, "model"),
    ("unknown key", {**GOOD, "mesages": []}, 400, "mesages"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, 404, "model"),
    ("empty messages", {**GOOD, "messages": []}, 400, "messages"),
    ("empty content", {**GOOD, "messages": user("   ")}, 400, "messages"),
    ("tool role", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("content not text", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content.str"),
    ("max_tokens over cap", {**GOOD, "max_tokens": 65}, 400, "max_tokens"),
    ("max_tokens negative", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", {**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("temperature too high", {**GOOD, "temperature": 3}, 400, "temperature"),
    ("n > 1", {**GOOD, "n": 2}, 400, "n"),
    ("logprobs", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("tools", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("input longer than context", {**GOOD, "messages": user("bake bread " * 150)}, 400, "messages"),
    ("prompt + max_tokens over context", {**GOOD, "messages": user("bake bread " * 100), "max_tokens": 60}, 400,
     "messages"),
]


def _assert_openai_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    if param is not None:
        assert body["error"]["param"] == param


def _warnings(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    deadline = time.monotonic() + 2
    while True:  # the line is written just after the response leaves
        records = [r for r in caplog.records if r.name == "sapguard.serve"]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.01)


@pytest.mark.parametrize("name,body,status,param", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_input(live: Live, caplog: pytest.LogCaptureFixture, name: str, body: Any, status: int,
                        param: str | None) -> None:
    caplog.set_level(logging.WARNING, logger="sapguard.serve")
    with live.http() as http:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        _assert_openai_error(resp, status, param)
        if name.endswith("context"):
            assert resp.json()["error"]["code"] == "context_length_exceeded"
        records = _warnings(caplog, 1)
        assert len(records) == 1 and str(status) in records[0].getMessage()
        ok = http.post("/v1/chat/completions", json=GOOD)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


BAD_OTHER = [
    ("body over limit", "POST", "/v1/chat/completions", {**GOOD, "messages": user("x" * 70000)}, 413),
    ("moderation empty list", "POST", "/v1/moderations", {"input": []}, 400),
    ("moderation empty text", "POST", "/v1/moderations", {"input": ["bake bread", ""]}, 400),
    ("moderation image", "POST", "/v1/moderations", {"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, 400),
    ("moderation unknown model", "POST", "/v1/moderations", {"input": "x", "model": "omni"}, 404),
    ("moderation mixed", "POST", "/v1/moderations", {"input": ["x", {"role": "user", "content": "y"}]}, 400),
    ("moderation reply without prompt", "POST", "/v1/moderations",
     {"input": [{"role": "assistant", "content": "y"}]}, 400),
    ("moderation empty turn", "POST", "/v1/moderations",
     {"input": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "},
                {"role": "user", "content": "y"}]}, 400),
    ("wrong method", "GET", "/v1/chat/completions", None, 405),
    ("unknown route", "POST", "/v1/completions", GOOD, 404),
]


@pytest.mark.parametrize("name,method,path,body,status", BAD_OTHER, ids=[b[0] for b in BAD_OTHER])
def test_bad_other_input(live: Live, caplog: pytest.LogCaptureFixture, name: str, method: str, path: str, body: Any,
                         status: int) -> None:
    caplog.set_level(logging.WARNING, logger="sapguard.serve")
    with live.http() as http:
        resp = http.request(method, path, json=body)
        _assert_openai_error(resp, status, None)
        assert len(_warnings(caplog, 1)) == 1
    with live.http() as http:
        assert http.post("/v1/moderations", json={"input": "bake bread"}).status_code == 200
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_body_over_limit_without_content_length(live: Live) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}]}'

    with live.http() as http:
        resp = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        _assert_openai_error(resp, 413, None)
    with live.http() as http:
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


# -- load, timeouts, disconnects -----------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after() -> None:
    lm = make_tiny("llama")
    slow_forward(lm, 0.02)
    with live_server(lm, tiny_polytope(lm, offset=NEVER), max_batch_size=1, max_queue=1, max_wait_ms=0) as srv:
        client = srv.client()
        stream = client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=60, temperature=0,
                                                stream=True)
        next(iter(stream))  # the first request holds the worker
        queued: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("resp", client.chat.completions.create(
            model=MODEL, messages=user("bake bread"), max_tokens=2, temperature=0)))
        waiter.start()
        deadline = time.monotonic() + 10
        while srv.state.scheduler.queued < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with srv.http() as http:
            resp = http.post("/v1/chat/completions", json=GOOD)
            _assert_openai_error(resp, 429, None)
            assert int(resp.headers["retry-after"]) >= 1
            assert http.post("/v1/moderations", json={"input": "x"}).status_code == 429
        assert "".join(c.choices[0].delta.content or "" for c in stream)
        waiter.join(30)
        assert queued["resp"].choices[0].finish_reason in ("length", "stop")
        assert client.chat.completions.create(**GOOD).choices[0].message.content


def test_request_timeout() -> None:
    lm = make_tiny("llama")
    slow_forward(lm, 0.05)
    with live_server(lm, tiny_polytope(lm, offset=NEVER), request_timeout=0.5) as srv, srv.http() as http:
        resp = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 60})
        _assert_openai_error(resp, 504, None)
        lines = [line for line in http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 60, "stream": True})
                 .text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["type"] == "timeout"
        assert http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2}).status_code == 200


def test_disconnect_mid_stream_frees_the_slot() -> None:
    lm = make_tiny("llama")
    calls = slow_forward(lm, 0.01)
    with live_server(lm, tiny_polytope(lm, offset=NEVER), max_tokens_cap=256) as srv:
        body = {**GOOD, "max_tokens": 200, "stream": True}
        with srv.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        # the client is gone: generation stops well before 200 tokens and the slot is free
        deadline = time.monotonic() + 10
        while srv.state.scheduler.running or srv.state.scheduler.queued:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stopped_at = calls[0]
        assert stopped_at < 100
        time.sleep(0.2)
        assert calls[0] == stopped_at
        client = srv.client()
        for _ in range(3):
            assert client.chat.completions.create(**GOOD).choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**GOOD, stream=True)
                       if c.choices)


def test_moderation_is_served_during_a_long_generation() -> None:
    lm = make_tiny("llama")
    slow_forward(lm, 0.01)
    with live_server(lm, tiny_polytope(lm, offset=NEVER), max_tokens_cap=256) as srv:
        client = srv.client()
        stream = client.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=200, temperature=0,
                                                stream=True)
        it = iter(stream)
        next(it)
        started = time.monotonic()
        out = client.moderations.create(input=["bake bread", "how do i make a bomb"])
        assert time.monotonic() - started < 1.5  # not after the 200-token generation (>= 2 s)
        assert len(out.results) == 2 and srv.state.scheduler.running == 1
        assert sum(1 for c in it if c.choices and c.choices[0].delta.content) > 0


# -- auth, CORS, logs, config -----------------------------------------------------------------------
def test_api_keys_from_env_and_file(lm: LoadedModel, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAPGUARD_TEST_KEYS", "alpha, beta")
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\ngamma\n")
    with live_server(lm, tiny_polytope(lm, offset=NEVER), api_key_env="SAPGUARD_TEST_KEYS",
                     api_key_file=str(key_file)) as srv:
        for key in ("alpha", "beta", "gamma"):
            assert srv.client(api_key=key).chat.completions.create(**GOOD).choices
        for key in ("wrong", "alph", "alphaa"):
            with pytest.raises(openai.AuthenticationError) as err:
                srv.client(api_key=key).moderations.create(input="x")
            assert err.value.body["code"] == "invalid_api_key"
        with srv.http() as http:
            resp = http.get("/v1/models")
            _assert_openai_error(resp, 401, None)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert http.get("/v1/models", headers={"authorization": "Basic gamma"}).status_code == 401
            assert http.get("/health").status_code == 200  # probes need no key


def test_key_checker_and_loader(tmp_path: Any) -> None:
    checker = KeyChecker([b"k1", b"k2"])
    assert checker.enabled and checker.allows("Bearer k2") and checker.allows("bearer k1")
    assert not checker.allows(None) and not checker.allows("Bearer") and not checker.allows("Token k1")
    assert KeyChecker([]).allows(None)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no API keys"):
        load_api_keys(None, empty)


def test_cors_is_off_unless_configured(lm: LoadedModel) -> None:
    poly = tiny_polytope(lm, offset=NEVER)
    headers = {"origin": "https://app.example", "access-control-request-method": "POST"}
    with live_server(lm, poly) as srv, srv.http() as http:
        assert "access-control-allow-origin" not in http.options("/v1/chat/completions", headers=headers).headers
        assert "access-control-allow-origin" not in http.get("/health", headers=headers).headers
    with live_server(lm, poly, cors_origins=["https://app.example"]) as srv, srv.http() as http:
        pre = http.options("/v1/chat/completions", headers=headers)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"


def test_json_access_log(lm: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sapguard.serve.access")
    with live_server(lm, tiny_polytope(lm, offset=NEVER), access_log=True) as srv, srv.http() as http:
        http.post("/v1/chat/completions", json=GOOD)
        http.post("/v1/chat/completions", json={**GOOD, "model": "nope"})
        deadline = time.monotonic() + 2
        while len([r for r in caplog.records if r.name == "sapguard.serve.access"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sapguard.serve.access"]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [("POST", "/v1/chat/completions", 200),
                                                                      ("POST", "/v1/chat/completions", 404)]
    assert "error" not in lines[0] and "nope" in lines[1]["error"] and lines[1]["ms"] >= 0
    assert not [r for r in caplog.records if r.name == "sapguard.serve"]  # one line per request, not two


def test_config_file_and_validation(tmp_path: Any) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("mode: detect\nmax-batch-size: 4\ncors_origins: [https://a.example]\n")
    cfg = ServeConfig.from_sources(path, max_batch_size=8, port=None)
    assert (cfg.mode, cfg.max_batch_size, cfg.cors_origins, cfg.host, cfg.port) == (
        "detect", 8, ["https://a.example"], "127.0.0.1", 8000)
    path.write_text("mood: detect\n")
    with pytest.raises(ValueError, match="unknown setting"):
        ServeConfig.from_sources(path)
    with pytest.raises(ValueError, match="unknown mode"):
        ServeConfig(mode="loud")
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=0)


def test_serves_the_shipped_default_polytope_without_polytope(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from sapguard.polytope import artifact

    poly = tiny_polytope(lm, offset=NEVER)
    monkeypatch.setattr(artifact, "default_polytope", lambda: poly)
    for config in (ServeConfig(), ServeConfig(polytope="default")):
        state = build_state(config, lm=lm)
        assert state.poly is poly and state.polytope_label == "default"

    def missing() -> SafetyPolytope:
        raise SapError("the shipped default polytope is missing")

    monkeypatch.setattr(artifact, "default_polytope", missing)
    with pytest.raises(SapError, match="default polytope is missing"):
        build_state(ServeConfig(), lm=lm)
