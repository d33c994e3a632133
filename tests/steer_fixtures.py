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
