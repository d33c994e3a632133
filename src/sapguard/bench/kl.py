"""KL divergence per token between steered and base next-token distributions.

Both distributions are taken along the *steered* trajectory: the steered model's logits come from
generation, the base model's from one teacher-forced pass over the same prompt + response.
KL(base || steered) is averaged over every generated token (EOS excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sapguard.features.hooks import left_pad


@torch.no_grad()
def per_token_kl(lm: Any, prompt_ids: Sequence[list[int]], gens: Sequence[Any]) -> list[float]:
    """Per-token KL(base || steered) for every token of every generation (with ``logits``)."""
    out: list[float] = []
    for ids, gen in zip(prompt_ids, gens):
        n = len(gen.token_ids)
        if n == 0 or gen.logits is None or gen.refused:
            continue
        seq = list(ids) + list(gen.token_ids)
        inputs = left_pad([seq], lm.tokenizer.pad_token_id, lm.device)
        base = lm.model(**inputs, use_cache=False).logits[0, len(ids) - 1 : len(ids) - 1 + n].float().cpu()
        p_log = torch.log_softmax(base, -1)
        q_log = torch.log_softmax(gen.logits[:n].float(), -1)
        out += (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0).tolist()
    return out
