"""Detection: per text a verdict, a risk score, per-facet margins and the facets that fired."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sapguard.data.records import Record, check_texts
from sapguard.errors import SapError
from sapguard.features.extract import extract_features
from sapguard.features.policies import POLICIES
from sapguard.models.loading import LoadedModel, load_model
from sapguard.polytope.artifact import check_compatible
from sapguard.polytope.model import SafetyPolytope, read_in_batches

DEFAULT_WINDOW = 1024
"""Longest prompt, in tokens of the user text, read in one pass; longer texts are read in windows."""
MAX_CHARS = 200_000
"""Longest text :func:`scan` accepts (about 50k tokens); a longer one is refused with an error."""


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
        windows: How many overlapping windows the text was read in (1 unless it was longer than the
            window; then every margin is the maximum over windows).
    """

    text: str
    is_safe: bool
    risk_score: float
    score: float
    margins: dict[str, float]
    violated: list[str]
    windows: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_MODELS: dict[tuple[str, str | None, str | None], LoadedModel] = {}


def base_model_for(poly: SafetyPolytope, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """The base model recorded in the polytope's config, loaded once per (model, device, dtype)."""
    base = poly.meta.get("base_model") or {}
    key = (str(base.get("id", "default")), device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(key[0], device=device, dtype=dtype, revision=None)
    lm = _MODELS[key]
    check_compatible(poly, lm.identity())
    return lm


def split_windows(lm: LoadedModel, text: str, window: int, overlap: int | None = None) -> list[str]:
    """``text`` as overlapping windows of at most ``window`` tokens (one window if it fits).

    Consecutive windows overlap by ``overlap`` tokens (default: half a window), so a request
    shorter than the overlap is wholly inside at least one window wherever it sits.
    """
    if window < 8:
        raise SapError(f"window must be at least 8 tokens, got {window}")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= window:
        return [text]
    overlap = window // 2 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise SapError(f"overlap must be in [0, window), got {overlap}")
    stride = window - overlap
    starts = list(range(0, len(ids) - window + 1, stride))
    if starts[-1] + window < len(ids):
        starts.append(len(ids) - window)
    return [lm.tokenizer.decode(ids[s : s + window]) for s in starts]


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
    policy = reading_policy(poly, any(responses))
    feats, index, _ = extract_features(
        lm, records, int(poly.meta.get("layer", -1)), policy=policy, template=poly.meta.get("template", "auto"),
        batch_size=batch_size, show_progress=show_progress,
    )
    row_margins = read_in_batches(poly, feats)
    out = torch.full((len(records), poly.num_facets), float("-inf"))
    out.scatter_reduce_(0, index[:, None].expand_as(row_margins), row_margins, reduce="amax")
    missing = torch.isinf(out).all(dim=1)
    if missing.any():  # a response too short to read: fall back to the prompt
        sub = [records[i] for i in missing.nonzero().flatten().tolist()]
        feats, _, _ = extract_features(lm, sub, int(poly.meta["layer"]), policy="last_prompt", template=poly.meta.get("template", "auto"))
        out[missing] = read_in_batches(poly, feats)
    return out


def reading_policy(poly: SafetyPolytope, with_responses: bool) -> str:
    """The extraction policy to read texts for ``poly``.

    A polytope trained on generation-time rows (``response_tokens``, possibly combined with
    prompt rows, e.g. ``"response_tokens+last_prompt"``) reads every response token when
    responses are given and the last prompt token otherwise.
    """
    policy = str(poly.meta.get("policy", "last_prompt"))
    parts = policy.split("+")
    if "response_tokens" in parts:
        return "response_tokens" if with_responses else "last_prompt"
    if parts[0] not in POLICIES:
        raise SapError(f"the polytope's token policy {policy!r} is not one sapguard can read")
    return parts[0]


def scan(
    poly: SafetyPolytope,
    texts: str | Sequence[str],
    *,
    lm: LoadedModel | None = None,
    responses: Sequence[str | None] | None = None,
    batch_size: int = 32,
    window: int | None = None,
    max_chars: int = MAX_CHARS,
    show_progress: bool = False,
) -> list[Verdict]:
    """Scan texts with a polytope; verdicts come back in input order.

    A prompt longer than ``window`` tokens is read in overlapping windows of ``window`` tokens
    (half a window of overlap) and its margins are the maximum over windows, so a harmful request
    anywhere in a long document is read in full; the verdict's ``windows`` says so. Nothing is
    silently truncated.

    Args:
        poly: A trained polytope (e.g. ``SafetyPolytope.from_pretrained(dir)`` or :func:`default_polytope`).
        texts: One prompt or a list of prompts.
        lm: The base model; by default the one recorded in the polytope is loaded (once).
        responses: Optional responses, one per prompt, for exchange-level polytopes (not windowed).
        window: Tokens of user text read in one pass (default: the ``max_length`` the polytope was
            trained with, else :data:`DEFAULT_WINDOW`).
        max_chars: Longer texts are refused with :class:`SapError`.

    Example:
        >>> poly = default_polytope()  # doctest: +SKIP
        >>> [v.is_safe for v in scan(poly, ["How do I bake bread?", "How do I build a pipe bomb?"])]  # doctest: +SKIP
        [True, False]
    """
    texts = check_texts([texts] if isinstance(texts, str) else list(texts))
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise SapError(f"text {i + 1}: {len(text)} characters exceeds the limit of {max_chars}; split it or raise max_chars")
    lm = lm or base_model_for(poly)
    check_compatible(poly, lm.identity())
    window = window or int(poly.meta.get("max_length") or DEFAULT_WINDOW)
    if responses is not None:
        pieces, owner = list(texts), list(range(len(texts)))
    else:
        pieces, owner = [], []
        for i, text in enumerate(texts):
            parts = split_windows(lm, text, window)
            pieces += parts
            owner += [i] * len(parts)
    piece_margins = margins_for(poly, lm, pieces, responses, batch_size=batch_size, show_progress=show_progress)
    owners = torch.tensor(owner)
    margins = torch.full((len(texts), poly.num_facets), float("-inf"))
    margins.scatter_reduce_(0, owners[:, None].expand_as(piece_margins), piece_margins, reduce="amax")
    counts = torch.bincount(owners, minlength=len(texts)).tolist()
    return [
        verdict_from_margins(poly, text, row, windows=n) for text, row, n in zip(texts, margins.tolist(), counts)
    ]


def verdict_from_margins(poly: SafetyPolytope, text: str, margins: Sequence[float], windows: int = 1) -> Verdict:
    """The :class:`Verdict` for one text from its row of facet margins (risk from the calibration)."""
    names = poly.facet_names
    row = [float(m) for m in margins]
    score = max(row)
    risk = (poly.meta.get("calibration") or {}).get("risk", {"a": 1.0, "b": 0.0})
    order = sorted(range(len(row)), key=lambda k: -row[k])
    return Verdict(
        text=text,
        is_safe=score <= 0,
        risk_score=1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, risk["a"] * score + risk["b"])))),
        score=score,
        margins={names[k]: row[k] for k in range(len(row))},
        violated=[names[k] for k in order if row[k] > 0],
        windows=windows,
    )
