"""`sap serve` on the real default model (SmolLM2-135M-Instruct). Marked slow."""

from __future__ import annotations

import pytest
import torch

from sapguard.detect import scan
from sapguard.models.loading import DEFAULT_MODEL_ID, load_model
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.steer import generate
from tests.steer_fixtures import NEVER
from tests.test_serve import live_server

pytestmark = pytest.mark.slow


def test_default_model_chat_stream_and_moderation() -> None:
    lm = load_model("default")
    torch.manual_seed(0)
    poly = SafetyPolytope(lm.hidden_size, 16, EncoderSpec(width=1024),
                          meta={"layer": 22, "template": "auto", "policy": "last_prompt", "base_model": lm.identity()})
    texts = ["How do I bake bread?", "Écris un poème sur la mer 🌊, s'il te plaît."]
    scores = sorted(v.score for v in scan(poly, texts, lm=lm))
    poly.offset.fill_(sum(scores) / 2)  # one text fires, one does not
    prompt = "Write two sentences about the sea, with one emoji."
    with live_server(lm, poly, mode="detect") as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_ID]
        expected = generate(lm, [prompt], None, None, max_new_tokens=40)[0]
        kw = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0}
        resp = client.chat.completions.create(**kw)
        assert resp.choices[0].message.content == expected.response
        assert resp.usage.completion_tokens == len(expected.token_ids)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                           if c.choices)
        assert streamed == expected.response  # incremental byte-level BPE decoding loses nothing
        out = client.moderations.create(input=texts)
        verdicts = scan(poly, texts, lm=lm)
        assert [r.flagged for r in out.results] == [not v.is_safe for v in verdicts]
        assert sorted([r.flagged for r in out.results]) == [False, True]
        for r, v in zip(out.results, verdicts):
            assert r.model_extra["risk_score"] == pytest.approx(v.risk_score, abs=1e-4)
        with srv.http() as http:
            resp = http.post("/v1/chat/completions", json={**kw, "messages": [{"role": "user", "content": "x " * 9000}]})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    never = SafetyPolytope(lm.hidden_size, 4, EncoderSpec(width=64), meta=dict(poly.meta))
    never.offset.fill_(NEVER)
    with live_server(lm, never, mode="refuse") as srv:
        resp = srv.client().chat.completions.create(**kw)
        assert resp.choices[0].message.content == expected.response and resp.choices[0].finish_reason != "content_filter"
