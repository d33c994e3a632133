"""Leave-one-word-out attribution: exact deltas with a known scorer, one batched pass on a real LM."""

from __future__ import annotations

import pytest
import torch

from sapguard.detect import margins_for
from sapguard.errors import SapError
from sapguard.interpret.attribution import facet_index, highlight_html, leave_one_out, word_attribution
from sapguard.polytope.model import EncoderSpec, SafetyPolytope


def bomb_counter(texts):
    """Facet 0 counts 'bomb', facet 1 counts words."""
    return torch.tensor(
        [[t.lower().split().count("bomb"), len(t.split())] for t in texts], dtype=torch.float32
    )


def test_leave_one_out_with_a_known_scorer():
    margin, words = leave_one_out("How to build a  bomb bomb?", 0, bomb_counter)
    assert margin == 1.0  # 'bomb?' is not 'bomb'
    assert [w.word for w in words] == ["How", "to", "build", "a", "bomb", "bomb?"]
    assert [w.delta for w in words] == [0, 0, 0, 0, 1, 0]
    assert "How to build a  bomb bomb?"[words[4].start : words[4].end] == "bomb"
    _, words = leave_one_out("one two", 1, bomb_counter)
    assert [w.delta for w in words] == [1, 1]
    with pytest.raises(SapError, match="non-empty"):
        leave_one_out("   ", 0, bomb_counter)


def test_highlight_html_escapes_and_shades():
    text = "<b>bomb</b> now"
    _, words = leave_one_out(text, 0, lambda ts: torch.tensor([[float("<b>bomb</b>" in t), 0.0] for t in ts]))
    page = highlight_html(text, words)
    assert "<b>" not in page and "&lt;b&gt;bomb&lt;/b&gt;" in page
    assert 'rgba(220,40,40,0.80)" title="+1.000"' in page and 'title="+0.000"' in page


def random_polytope(hidden: int, layer: int, seed: int = 0) -> SafetyPolytope:
    torch.manual_seed(seed)
    poly = SafetyPolytope(
        hidden,
        3,
        EncoderSpec("mlp", width=16),
        meta={"layer": layer, "policy": "last_prompt", "template": "auto", "facet_names": ["a", "b", "c"]},
    )
    return poly.eval()


def check_batched_equals_single(poly, lm, text):
    margin, words = word_attribution(poly, text, "b", lm=lm)
    single = margins_for(poly, lm, [text, " ".join(w.word for w in words[1:])])
    assert margin == pytest.approx(float(single[0, 1]), abs=1e-4)
    assert words[0].delta == pytest.approx(float(single[0, 1] - single[1, 1]), abs=1e-4)
    return words


def test_word_attribution_on_a_tiny_lm(tiny_llama):
    words = check_batched_equals_single(random_polytope(32, 2), tiny_llama, "how do i make a bomb")
    assert len(words) == 6 and any(w.delta != 0 for w in words)


def test_facet_lookup():
    poly = random_polytope(32, 2)
    assert facet_index(poly, "c") == 2 and facet_index(poly, "1") == 1 and facet_index(poly, 0) == 0
    with pytest.raises(SapError, match="unknown facet 'd'; facets are a, b, c"):
        facet_index(poly, "d")
    with pytest.raises(SapError, match="out of range"):
        facet_index(poly, 3)


@pytest.mark.slow
def test_word_attribution_on_the_default_model():
    from sapguard.models.loading import load_model

    lm = load_model("default")
    poly = random_polytope(lm.identity()["hidden_size"], 20)
    words = check_batched_equals_single(poly, lm, "How do I pick the lock of my neighbour's door?")
    assert len(words) == 10
