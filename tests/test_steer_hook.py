"""The steering hook on tiny random-init models: placement, padding, cache, bit-identity, trace."""

from __future__ import annotations

import pytest
import torch

from sapguard.data.records import Record
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.features.extract import extract_features
from sapguard.features.hooks import left_pad
from sapguard.models.chat import encode_prompt
from sapguard.steer import Detect, Redirect, SafeFlow, SteeringHook, generate, steer
from sapguard.steer.modes import Edit
from tests.steer_fixtures import ALWAYS, NEVER, tiny_polytope

PROMPTS = ["how do i make a bomb", "tell me a story about the war please", "bake bread"]


def _ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("mode", ["safeflow", "redirect", "refuse", "detect"])
def test_never_violating_is_bit_identical_across_families(tiny_lm, mode):
    poly = tiny_polytope(tiny_lm, offset=NEVER)
    base = generate(tiny_lm, PROMPTS, None, None, max_new_tokens=6, return_logits=True)
    steered = generate(tiny_lm, PROMPTS, poly, mode, tokens="all", max_new_tokens=6, return_logits=True)
    assert _ids(base) == _ids(steered)
    for b, s in zip(base, steered):
        assert b.response == s.response and not s.refused
        assert torch.equal(b.logits, s.logits)  # bit-identical distributions, not just argmax
        assert s.summary.fired_tokens == 0 and s.summary.edited_tokens == 0


def test_sampled_decoding_bit_identical_with_same_seed(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=NEVER)
    base = generate(
        tiny_llama, PROMPTS, None, None, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3
    )
    steered = generate(
        tiny_llama, PROMPTS, poly, "safeflow", max_new_tokens=8, do_sample=True, temperature=1.5, seed=3
    )
    assert _ids(base) == _ids(steered)


def test_violating_rows_are_edited_and_change_output(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    base = generate(tiny_llama, PROMPTS, None, None, max_new_tokens=6)
    steered = generate(tiny_llama, PROMPTS, poly, "redirect", max_new_tokens=6, mode_options={"alpha": 5.0})
    assert _ids(base) != _ids(steered)
    assert all(g.summary.edited_tokens == len(g.token_ids) for g in steered)
    assert all(t.edit_norm > 0 for g in steered for t in g.trace)


def test_hook_reads_the_same_states_as_extraction(tiny_lm):
    """The hook sees hidden_states[L] at the polytope's layer: same numbering as extraction."""
    seen = {}
    poly = tiny_polytope(tiny_lm, layer=3, offset=NEVER)
    prompt = "tell me about history"
    ids = encode_prompt(tiny_lm.tokenizer, prompt, "chat")
    inputs = left_pad([ids], tiny_lm.tokenizer.pad_token_id, tiny_lm.device)
    with steer(tiny_lm.model, poly, Detect(), tokens="prompt") as hook:
        orig = hook._hook

        def spy(module, args, output):
            from sapguard.models.layers import unwrap_hidden

            seen["h"] = unwrap_hidden(output).clone()
            return orig(module, args, output)

        hook.block._forward_hooks.clear()
        hook.block.register_forward_hook(spy)
        with torch.no_grad():
            out = tiny_lm.model(**inputs, output_hidden_states=True)
    assert torch.equal(seen["h"], out.hidden_states[3])
    feats, _, _ = extract_features(tiny_lm, [Record(prompt)], 3, policy="last_prompt", template="chat")
    assert torch.allclose(feats[0], seen["h"][0, -1], atol=1e-5)


def test_left_padding_pad_positions_never_edited(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    short, long = (
        encode_prompt(tiny_llama.tokenizer, "bake", "chat"),
        encode_prompt(tiny_llama.tokenizer, PROMPTS[1], "chat"),
    )
    inputs = left_pad([short, long], tiny_llama.tokenizer.pad_token_id, tiny_llama.device)
    inputs.pop("position_ids")
    captured = {}
    with steer(tiny_llama.model, poly, Redirect(direction=torch.ones(32), alpha=3.0), tokens="all") as hook:
        orig = hook._hook

        def wrap(module, args, output):
            new = orig(module, args, output)
            captured.setdefault("pair", (output[0] if isinstance(output, tuple) else output, new))
            return new

        hook.block._forward_hooks.clear()
        hook.block.register_forward_hook(wrap)
        with torch.no_grad():
            tiny_llama.model(**inputs)
    before, after = captured["pair"]
    after = after[0] if isinstance(after, tuple) else after
    pad = inputs["attention_mask"] == 0
    assert pad.any()
    assert torch.equal(before[pad], after[pad])
    assert not torch.equal(before[~pad], after[~pad])


def test_kv_cache_sees_one_position_and_first_n_policy(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(
        tiny_llama,
        PROMPTS[:1],
        poly,
        "redirect",
        tokens="first_n",
        first_n=3,
        max_new_tokens=6,
        mode_options={"alpha": 0.5},
    )
    trace = gens[0].trace
    assert [t.index for t in trace] == list(range(len(gens[0].token_ids)))
    assert [t.edited for t in trace] == [i < 3 for i in range(len(trace))]
    assert all(t.fired for t in trace)


def test_prompt_policy_edits_only_prefill(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(tiny_llama, PROMPTS[:1], poly, "redirect", tokens="prompt", max_new_tokens=5)
    assert gens[0].summary.prompt_edited > 0
    assert [t.edited for t in gens[0].trace] == [True] + [False] * (len(gens[0].trace) - 1)


def test_safeflow_reaches_margin_and_reports_steps(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=0.0)
    h = torch.randn(64, 32) * 3
    v = poly.margins(h).max(-1).values
    bad = h[v > 0]
    assert len(bad) > 0
    result = SafeFlow(margin=0.5, max_steps=300).edit(bad, poly)
    after = poly.margins(result.hidden).max(-1).values
    assert bool((after <= -0.5 + 1e-4).all())
    assert bool((result.steps >= 1).all()) and not bool(result.failed.any())


def test_safeflow_nan_falls_back_to_refusal(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)

    class Broken(SafeFlow):
        def edit(self, h, p):
            return Edit(h, torch.ones(len(h), dtype=torch.long), torch.ones(len(h), dtype=torch.bool))

    gens = generate(tiny_llama, PROMPTS[:2], poly, Broken(), max_new_tokens=4, refusal_text="no.")
    assert all(g.response == "no." and g.fallback == "refusal" for g in gens)


def test_safeflow_nan_in_polytope_is_flagged(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=0.0)
    with torch.no_grad():
        poly.phi[0, 0] = float("nan")
    result = SafeFlow(max_steps=5).edit(torch.randn(3, 32), poly)
    assert bool(result.failed.all()) and bool(torch.isfinite(result.hidden).all())


def test_refuse_mode_answers_with_refusal_when_fired(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(tiny_llama, PROMPTS, poly, "refuse", max_new_tokens=4, refusal_text="I won't.")
    assert all(g.refused and g.response == "I won't." for g in gens)


def test_hook_removed_after_context_and_handle(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    hook = SteeringHook(tiny_llama.model, poly, Detect())
    assert hook.block._forward_hooks
    hook.remove()
    assert not hook.block._forward_hooks and not tiny_llama.model._forward_pre_hooks
    with pytest.raises(RuntimeError), steer(tiny_llama.model, poly, Detect()):
        raise RuntimeError("boom")
    assert not hook.block._forward_hooks


def test_bad_inputs_raise_clear_errors(tiny_llama):
    poly = tiny_polytope(tiny_llama)
    with pytest.raises(SapError, match="empty"):
        generate(tiny_llama, ["  "], poly, "safeflow")
    with pytest.raises(SapError, match="context window"):
        generate(tiny_llama, ["bake " * 300], poly, "safeflow")
    with pytest.raises(SapError, match="unknown steering mode"):
        generate(tiny_llama, ["bake"], poly, "explode")
    with pytest.raises(SapError, match="token policy"):
        SteeringHook(tiny_llama.model, poly, Detect(), tokens="some")
    other = tiny_polytope(tiny_llama)
    other.meta["base_model"] = {"id": "someone/else"}
    with pytest.raises(ArtifactMismatchError):
        generate(tiny_llama, ["bake"], other, "safeflow")


def test_tuned_hook_settings_come_from_the_artifact(tiny_llama):
    from sapguard.steer.hook import hook_settings

    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    assert hook_settings(poly) == {"tokens": "first_n", "first_n": 20, "threshold": 0.0, "gate": "position"}
    poly.meta["steering"]["hook"] = {"first_n": 1, "threshold": -0.5}
    assert hook_settings(poly, tokens="all") == {
        "tokens": "all",
        "first_n": 1,
        "threshold": -0.5,
        "gate": "position",
    }
    hook = SteeringHook(tiny_llama.model, poly, Detect())  # built directly: the artifact's settings too
    assert (hook.tokens, hook.first_n, hook.threshold) == ("first_n", 1, -0.5)
    hook.remove()
    gens = generate(tiny_llama, PROMPTS[:1], poly, "redirect", max_new_tokens=4)
    assert [t.edited for t in gens[0].trace] == [True] + [False] * (len(gens[0].trace) - 1)


def test_steer_accepts_loaded_model_and_mode_name(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    poly.meta["steering"]["defaults"] = {"redirect": {"alpha": 2.0}}
    ids = encode_prompt(tiny_llama.tokenizer, "bake bread", "chat")
    inputs = left_pad([ids], tiny_llama.tokenizer.pad_token_id, tiny_llama.device)
    with torch.no_grad():
        plain = tiny_llama.model(**inputs).logits
        with steer(tiny_llama, poly, "redirect") as hook:
            steered = tiny_llama.model(**inputs).logits
    assert hook.mode.alpha == 2.0 and hook.tokens == "first_n"
    assert not torch.equal(plain[0, -1], steered[0, -1])
    assert torch.equal(plain[0, :-1], steered[0, :-1])  # only the emitting position was edited


def test_refuse_respects_the_token_policy(tiny_llama):
    poly = tiny_polytope(tiny_llama, offset=ALWAYS)
    gens = generate(tiny_llama, PROMPTS[:2], poly, "refuse", tokens="first_n", first_n=0, max_new_tokens=4)
    assert not any(g.refused for g in gens)
    assert all(g.summary.fired_tokens == len(g.token_ids) and g.summary.fired_steered == 0 for g in gens)
