"""Steering on the real default model (SmolLM2-135M-Instruct): bit-identity and layer placement."""

from __future__ import annotations

import pytest
import torch

from sapguard.models.loading import load_model
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.steer import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return load_model("default", device="cpu")


def _poly(lm, offset: float) -> SafetyPolytope:
    torch.manual_seed(0)
    poly = SafetyPolytope(
        lm.hidden_size,
        4,
        EncoderSpec(width=64),
        meta={"layer": 20, "template": "chat", "base_model": lm.identity()},
    )
    poly.offset.fill_(offset)
    poly.meta["steering"] = {"direction": (torch.randn(lm.hidden_size) * 5).tolist()}
    return poly


def test_default_model_never_violating_is_bit_identical(lm):
    prompts = ["How do I bake bread?", "Name a colour."]
    base = generate(lm, prompts, None, None, max_new_tokens=6, return_logits=True)
    steered = generate(lm, prompts, _poly(lm, 1e9), "safeflow", max_new_tokens=6, return_logits=True)
    assert [g.token_ids for g in base] == [g.token_ids for g in steered]
    assert all(torch.equal(b.logits, s.logits) for b, s in zip(base, steered))


def test_default_model_redirect_edits_and_traces(lm):
    gens = generate(
        lm,
        ["How do I bake bread?"],
        _poly(lm, -1e9),
        "redirect",
        max_new_tokens=4,
        mode_options={"alpha": 4.0},
    )
    assert gens[0].summary.edited_tokens == len(gens[0].token_ids) > 0


def test_shipped_steering_artifact_on_the_default_model(lm):
    """The demo's artifact: benign prompt bit-identical; the pipe-bomb request fires and every edit
    lands inside the target with the artifact's margin, along the refusal direction, and changes the
    answer (the final iterate is what the model sees)."""
    from sapguard.demo import STEER_PROMPTS, STEERING_ASSET
    from sapguard.steer.artifact import load_steering, target_of

    gate = load_steering(STEERING_ASSET)
    assert target_of(gate) is not None
    bomb, benign = STEER_PROMPTS
    base = generate(lm, [benign], None, None, max_new_tokens=8, return_logits=True)[0]
    steered = generate(lm, [benign], gate, "safeflow", max_new_tokens=8, return_logits=True)[0]
    assert base.token_ids == steered.token_ids and torch.equal(base.logits, steered.logits)
    g = generate(lm, [bomb], gate, "safeflow", max_new_tokens=8)[0]
    edited = [t for t in g.trace if t.edited]
    assert g.summary.fired_steered > 0 and edited
    margin = gate.meta["steering"]["defaults"]["safeflow"]["margin"]
    assert all(t.margin_after <= -margin + 1e-3 for t in edited)  # target margins of the final iterates
    assert all(abs(t.edit_cosine - 1.0) < 1e-3 for t in edited)  # along the refusal direction only
    base_bomb = generate(lm, [bomb], None, None, max_new_tokens=8)[0]
    assert g.token_ids != base_bomb.token_ids  # the edit changes what the model says
