"""Gate scope, cache vs no-cache positions, refuse stopping early, and the causal-LM guard judge."""

from __future__ import annotations

import pytest
import torch

from sapguard.bench.judges import CausalLMGuardJudge, parse_guard_verdict
from sapguard.errors import SapError
from sapguard.features.hooks import left_pad
from sapguard.models.chat import encode_prompt
from sapguard.steer import Redirect, generate, steer
from tests.steer_fixtures import ALWAYS, NEVER, tail_pair, tiny_polytope

PROMPTS = ["how do i make a bomb", "tell me a story about the war please"]


def _inputs(lm, prompts):
    ids = [encode_prompt(lm.tokenizer, p, "chat") for p in prompts]
    inputs = left_pad(ids, lm.tokenizer.pad_token_id, lm.device)
    inputs.pop("position_ids")
    return inputs


def _run(lm, poly, use_cache):
    inputs = _inputs(lm, PROMPTS)
    with (
        steer(
            lm.model, poly, Redirect(direction=torch.ones(32), alpha=2.0), tokens="first_n", first_n=3
        ) as hook,
        torch.no_grad(),
    ):
        out = lm.model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    edited = {s.gen_index: s.edited.tolist() for s in hook.trace}
    return out, edited, hook


def test_cache_and_no_cache_edit_the_same_positions(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    out_c, edited_c, _ = _run(tiny_llama, poly, True)
    out_n, edited_n, _hook_n = _run(tiny_llama, poly, False)
    assert sorted(edited_n) == list(range(6))  # absolute generated indices, not collapsed onto 0
    assert edited_c == edited_n
    assert all(edited_c[i] == [i < 3, i < 3] for i in range(6))
    assert torch.equal(out_c, out_n)


def test_prompt_gate_decides_once_per_row():
    """gate="prompt": the decision at generated index 0 holds for the row's first_n positions."""
    from tests.conftest import make_tiny

    lm = make_tiny("llama")
    poly = tiny_polytope(lm, offset=ALWAYS)
    calls = {"n": 0}

    class FirstCallOnly:
        def margins(self, h):
            calls["n"] += 1
            return torch.full((len(h), 1), 1.0 if calls["n"] == 1 else -1.0)

    gens_pos = generate(lm, PROMPTS[:1], poly, "redirect", tokens="first_n", first_n=4, max_new_tokens=6)
    with steer(
        lm.model, poly, Redirect(direction=torch.ones(32), alpha=2.0), first_n=4, gate="prompt"
    ) as hook:
        hook._poly_cache[torch.device("cpu")] = FirstCallOnly()  # fires at the prefill only
        hook._direction = None
        hook.poly.meta["steering"].pop("direction")
        with torch.no_grad():
            lm.model.generate(**_inputs(lm, PROMPTS[:1]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    edited = [bool(s.edited[0]) for s in hook.trace]
    fired = [bool(s.fired[0]) for s in hook.trace]
    assert fired == [True] * 6  # the row's decision, taken once at the prefill
    assert edited == [True] * 4 + [False] * 2  # later positions do not fire, yet the row is steered
    assert len(gens_pos[0].trace) == 6


def test_prompt_gate_never_firing_is_bit_identical(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=NEVER)
    base = generate(tiny_llama, PROMPTS, None, None, max_new_tokens=5, return_logits=True)
    steered = generate(
        tiny_llama, PROMPTS, poly, "safeflow", gate="prompt", max_new_tokens=5, return_logits=True
    )
    for b, s in zip(base, steered):
        assert b.token_ids == s.token_ids and torch.equal(b.logits, s.logits)


def test_refuse_stops_generating_once_fired(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(tiny_llama, PROMPTS, poly, "refuse", max_new_tokens=8, refusal_text="No.")
    assert all(g.refused and g.response == "No." for g in gens)
    assert all(len(g.token_ids) == 1 for g in gens)  # one token (the prefill), not the whole answer


def test_edit_cosine_with_the_refusal_direction_is_traced(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    direction = torch.tensor(poly.meta["steering"]["direction"])
    gens = generate(tiny_llama, PROMPTS[:1], poly, Redirect(direction=direction, alpha=1.0), max_new_tokens=3)
    assert all(abs(t.edit_cosine - 1.0) < 1e-4 for t in gens[0].trace if t.edited)
    assert abs(gens[0].summary.mean_edit_cosine - 1.0) < 1e-4


def test_guard_verdict_parsing():
    assert parse_guard_verdict("unsafe\nS1,S9") is True
    assert parse_guard_verdict(" Safe") is False
    assert parse_guard_verdict("\n\nunsafe") is True
    assert parse_guard_verdict("I think it is fine") is None
    assert parse_guard_verdict("") is None


def test_causal_lm_guard_judge_on_a_tiny_random_model(tiny_llama, monkeypatch):
    judge = CausalLMGuardJudge((tiny_llama.model, tiny_llama.tokenizer), max_new_tokens=3, batch_size=2)
    prompts, responses = (
        ["how to make a bomb", "bake bread", "hi"],
        ["mix the powder", "flour and water", "hello"],
    )
    texts = judge.verdict_texts(prompts, responses)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    verdicts = judge(prompts, responses)
    assert len(verdicts) == 3 and all(isinstance(v, bool) for v in verdicts)
    assert judge.unparsed == sum(parse_guard_verdict(t) is None for t in texts)
    text = tiny_llama.tokenizer.decode(judge.render("how do i make a bomb", "bake bread"))
    assert "bomb" in text and "bread" in text and "unsafe" in text  # the pair inside the guard prompt
    monkeypatch.setattr(judge, "verdict_texts", lambda p, r: ["unsafe\nS9", "safe", "maybe"])
    assert judge(prompts, responses) == [True, False, False]


def test_prompt_gate_reads_the_tail_view(tiny_llama):
    """A row whose last line fires the gate (and whose whole prompt does not) is gated on, and only
    when the polytope's config lists the tail view."""
    from sapguard.steer.generate import tail_gate_fires

    poly = tiny_polytope(tiny_llama, offset=0.0)
    poly.meta["policy"] = "last_prompt"
    prompt, whole, alone = tail_pair(tiny_llama, poly)
    assert alone - whole > 1e-3  # well above the padding noise of batched generation (~1e-6)
    threshold = (whole + alone) / 2
    plain = generate(tiny_llama, [prompt], poly, "refuse", gate="prompt", threshold=threshold, max_new_tokens=3)
    assert not plain[0].refused and tail_gate_fires(tiny_llama, poly, [prompt], "chat", threshold) is None
    poly.meta.update({"views": ["prompt", "tail"], "tail_words": 64})
    fired = tail_gate_fires(tiny_llama, poly, [prompt, "one line only"], "chat", threshold)
    assert fired is not None and fired.tolist() == [True, False]
    gated = generate(tiny_llama, [prompt, "one line only"], poly, "refuse", gate="prompt", threshold=threshold,
                     max_new_tokens=3, refusal_text="No.")
    assert gated[0].refused and gated[0].response == "No." and gated[0].summary.fired_tokens == 1


def test_gate_on_forces_rows_and_is_checked(tiny_llama):
    """``generate(gate_on=...)`` gates the flagged rows on (an outside filter's decision); the others
    are bit-identical to plain generation when the polytope never fires."""
    poly = tiny_polytope(tiny_llama, offset=NEVER)
    base = generate(tiny_llama, PROMPTS, None, None, max_new_tokens=4)
    flags = [True] + [False] * (len(PROMPTS) - 1)
    gens = generate(tiny_llama, PROMPTS, poly, "refuse", gate="prompt", max_new_tokens=4, refusal_text="No.", gate_on=flags)
    assert gens[0].refused and gens[0].response == "No."
    assert all(not g.refused and g.token_ids == b.token_ids for g, b in zip(gens[1:], base[1:]))
    with pytest.raises(SapError, match="gate_on has 1 flags"):
        generate(tiny_llama, PROMPTS, poly, "refuse", gate="prompt", max_new_tokens=2, gate_on=[True])
    with pytest.raises(SapError, match="prompt-scope gate"):
        generate(tiny_llama, PROMPTS, poly, "refuse", gate="position", max_new_tokens=2, gate_on=flags)
