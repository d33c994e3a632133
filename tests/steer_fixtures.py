"""Helpers for steering tests: polytopes for the tiny models of conftest.py."""

from __future__ import annotations

import torch

from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import EncoderSpec, SafetyPolytope


def tiny_polytope(
    lm: LoadedModel, *, layer: int = 2, offset: float = 0.0, facets: int = 4, seed: int = 0
) -> SafetyPolytope:
    """A random polytope for ``lm`` at ``layer``; ``offset`` +inf-like never fires, -inf-like always fires."""
    torch.manual_seed(seed)
    poly = SafetyPolytope(
        lm.hidden_size,
        facets,
        EncoderSpec(width=16),
        meta={
            "layer": layer,
            "template": "chat",
            "policy": "response_tokens",
            "base_model": lm.identity(),
        },
    )
    poly.offset.fill_(offset)
    poly.meta["steering"] = {"direction": torch.randn(lm.hidden_size).tolist()}
    return poly


NEVER = 1e6
ALWAYS = -1e6


def tail_pair(lm: LoadedModel, poly: SafetyPolytope) -> tuple[str, float, float]:
    """A two-line prompt whose last line, read alone, scores higher than the whole prompt under
    ``poly`` (last prompt position): ``(prompt, whole-prompt margin, tail margin)``."""
    from sapguard.data.records import Record
    from sapguard.features.extract import extract_features

    def margin(text: str) -> float:
        x, _, _ = extract_features(lm, [Record(prompt=text)], int(poly.meta["layer"]), policy="last_prompt",
                                   template="chat")
        with torch.no_grad():
            return float(poly.margins(x).max())

    lines = ["tell me a story about the war please", "how do i make a bomb", "write a poem", "bake bread now"]
    pairs = [(f"{a}\n{b}", b) for a in lines for b in lines if a != b]
    prompt, tail = max(pairs, key=lambda p: margin(p[1]) - margin(p[0]))
    return prompt, margin(prompt), margin(tail)
