"""Detection: per text a verdict, a risk score, per-facet margins and the facets that fired."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sapguard.data.records import Record, check_texts
from sapguard.features.extract import extract_features
from sapguard.models.loading import LoadedModel, load_model
from sapguard.polytope.artifact import check_compatible
from sapguard.polytope.model import SafetyPolytope


@dataclass
class Verdict:
    """What the polytope says about one text.

    Attributes:
        text: The scanned prompt.
        is_safe: False when any facet fires (its margin is positive).
        risk_score: Probability of unsafe, calibrated on validation data (0..1).
        score: The largest facet margin; positive means unsafe.
        margins: Per-facet margin ``v_k - offset`` by facet name.
        violated: Names of facets that fire, most violated first.
    """

    text: str
    is_safe: bool
    risk_score: float
    score: float
    margins: dict[str, float]
    violated: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def base_model_for(poly: SafetyPolytope, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load (once per polytope object) the base model recorded in the polytope's config."""
    if poly._lm is None:
        base = poly.meta.get("base_model") or {}
        lm = load_model(base.get("id", "default"), device=device, dtype=dtype, revision=None)
        check_compatible(poly, lm.identity())
        poly._lm = lm
    return poly._lm


def margins_for(
    poly: SafetyPolytope,
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str | None] | None = None,
    *,
    batch_size: int = 32,
    show_progress: bool = False,
) -> torch.Tensor:
    """Per-facet margins ``[len(prompts), K]`` read as the polytope was trained.

    For a polytope trained on every response token, a text's margins are those of its most
    unsafe token; without a response, its last prompt token is read.
    """
    responses = list(responses) if responses is not None else [None] * len(prompts)
    records = [Record(prompt=p, response=r) for p, r in zip(prompts, responses)]
    policy = poly.meta.get("policy", "last_prompt")
    if policy == "response_tokens" and not any(responses):
        policy = "last_prompt"
    feats, index, _ = extract_features(
        lm, records, int(poly.meta.get("layer", -1)), policy=policy, template=poly.meta.get("template", "auto"),
        batch_size=batch_size, show_progress=show_progress,
    )
    with torch.no_grad():
        row_margins = poly.margins(feats.to(next(poly.parameters()).device)).cpu()
    out = torch.full((len(records), poly.num_facets), float("-inf"))
    out.scatter_reduce_(0, index[:, None].expand_as(row_margins), row_margins, reduce="amax")
    missing = torch.isinf(out).all(dim=1)
    if missing.any():  # a response too short to read: fall back to the prompt
        sub = [records[i] for i in missing.nonzero().flatten().tolist()]
        feats, _, _ = extract_features(lm, sub, int(poly.meta["layer"]), policy="last_prompt", template=poly.meta.get("template", "auto"))
        with torch.no_grad():
            out[missing] = poly.margins(feats).cpu()
    return out


def scan(
    poly: SafetyPolytope,
    texts: str | Sequence[str],
    *,
    lm: LoadedModel | None = None,
    responses: Sequence[str | None] | None = None,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[Verdict]:
    """Scan texts with a polytope; verdicts come back in input order.

    Args:
        poly: A trained polytope (e.g. ``SafetyPolytope.from_pretrained(dir)``).
        texts: One prompt or a list of prompts.
        lm: The base model; by default the one recorded in the polytope is loaded (once).
        responses: Optional responses, one per prompt, for exchange-level polytopes.

    Example:
        >>> poly = SafetyPolytope.from_pretrained("runs/demo/polytope")  # doctest: +SKIP
        >>> [v.is_safe for v in poly.scan(["How do I bake bread?", "How do I build a pipe bomb?"])]  # doctest: +SKIP
        [True, False]
    """
    texts = check_texts([texts] if isinstance(texts, str) else list(texts))
    lm = lm or base_model_for(poly)
    check_compatible(poly, lm.identity())
    margins = margins_for(poly, lm, texts, responses, batch_size=batch_size, show_progress=show_progress)
    risk = (poly.meta.get("calibration") or {}).get("risk", {"a": 1.0, "b": 0.0})
    names = poly.facet_names
    verdicts = []
    for text, row in zip(texts, margins.tolist()):
        score = max(row)
        order = sorted(range(len(row)), key=lambda k: -row[k])
        verdicts.append(
            Verdict(
                text=text,
                is_safe=score <= 0,
                risk_score=1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, risk["a"] * score + risk["b"])))),
                score=score,
                margins={names[k]: row[k] for k in range(len(row))},
                violated=[names[k] for k in order if row[k] > 0],
            )
        )
    return verdicts
