"""Refuse mode's rule, shared by `generate(..., "refuse")` and the bench's refuse condition (which
re-reads the base run's detect traces instead of generating again)."""

from __future__ import annotations

import torch

from sapguard.bench.run import _refuse_from_detect
from sapguard.steer.generate import Generation, generate
from sapguard.steer.trace import TraceSummary
from tests.steer_fixtures import ALWAYS, NEVER, tiny_polytope

PROMPTS = ["how do i make a bomb", "tell me a story about the war please", "hello there", "a b c d e f"]


def _gen(*, prompt_fired: bool = False, fired_steered: int = 0, fired_tokens: int = 0) -> Generation:
    summary = TraceSummary(
        tokens=3, fired_tokens=fired_tokens, fired_steered=fired_steered, prompt_fired=prompt_fired
    )
    return Generation("p", "the answer", [5, 6, 7], "detect", summary=summary, logits=torch.ones(3, 4))


def test_bench_refuse_from_detect_rule():
    gens = [
        _gen(),  # nothing fired
        _gen(prompt_fired=True),  # a selected prompt position fired
        _gen(fired_steered=1, fired_tokens=1),  # a generated token the policy steers fired
        _gen(fired_tokens=2),  # fired only on tokens the policy does not steer: not refused
    ]
    out = _refuse_from_detect(gens, "No.")
    assert [g.refused for g in out] == [False, True, True, False]
    assert [g.response for g in out] == ["the answer", "No.", "No.", "the answer"]
    assert all(g.mode == "refuse" for g in out)
    assert [g.logits is None for g in out] == [False, True, True, False]  # a refused row's logits are dropped
    assert all(g.token_ids == [5, 6, 7] and g.prompt == "p" and g.fallback is None for g in out)
    assert all(o.summary == g.summary for o, g in zip(out, gens))
    # the base run's generations are not changed (the bench reports them as the base condition)
    assert all(g.mode == "detect" and g.response == "the answer" and not g.refused for g in gens)
    assert all(g.logits is not None for g in gens)


def test_generate_refuse_agrees_with_the_rule_on_detect_traces(tiny_llama):
    """For each row, refuse mode refuses exactly when the rule holds on the detect run's trace."""
    seen = set()
    for offset in (NEVER, ALWAYS, 0.0, 0.3, -0.3):
        for tokens in ("generated", "prompt", "all", "first_n"):
            poly = tiny_polytope(tiny_llama, offset=offset)
            opts = {"tokens": tokens, "first_n": 2, "max_new_tokens": 5}
            detect = generate(tiny_llama, PROMPTS, poly, "detect", **opts)
            refuse = generate(tiny_llama, PROMPTS, poly, "refuse", refusal_text="No.", **opts)
            expected = [d.summary.prompt_fired or d.summary.fired_steered > 0 for d in detect]
            assert [r.refused for r in refuse] == expected
            assert [d.refused for d in detect] == [False] * len(PROMPTS)
            for d, r, e in zip(detect, refuse, expected):
                assert r.mode == "refuse" and r.fallback is None
                assert r.response == ("No." if e else d.response)
                if not e:
                    assert r.token_ids == d.token_ids
            assert [b.refused for b in _refuse_from_detect(detect, "No.")] == expected
            seen.update(expected)
    assert seen == {True, False}


def test_generate_refuse_keeps_logits_of_a_refused_row(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(
        tiny_llama, PROMPTS[:2], poly, "refuse", max_new_tokens=4, refusal_text="No.", return_logits=True
    )
    assert all(g.refused and g.logits is not None and len(g.logits) == len(g.token_ids) for g in gens)
