"""Per-token steering traces: what the polytope saw and what the hook did at each generated token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TraceStep:
    """One forward call of the steered block, for every row of the batch.

    The *emitting* position of a call is its last position: the state whose next-token
    distribution produces generated token ``gen_index`` (0 = first generated token, read at the
    last prompt position during prefill).

    Attributes:
        gen_index: Index of the generated token this call emits.
        margins: ``[B, K]`` per-facet margins at the emitting position before any edit.
        fired: ``[B]`` the emitting position violated the polytope (max margin > threshold).
        steered: ``[B]`` the emitting position is one the token policy may edit.
        edited: ``[B]`` the emitting position was edited.
        edit_norm: ``[B]`` L2 norm of the edit at the emitting position (0 when not edited).
        steps: ``[B]`` optimisation steps used at the emitting position.
        failed: ``[B]`` the optimisation failed (non-finite) at the emitting position.
        margin_after: ``[B]`` max margin after the edit, in the polytope the mode solved (SafeFlow's
            target when it has one; equals the before value when not edited).
        edit_cosine: ``[B]`` cosine between the edit and the artifact's refusal direction (0 when
            not edited or when the artifact has no direction).
        prompt_fired: ``[B]`` any selected prompt position (before the emitting one) fired; only
            set on the prefill call.
        prompt_edited: ``[B]`` number of such prompt positions edited.
    """

    gen_index: int
    margins: torch.Tensor
    fired: torch.Tensor
    steered: torch.Tensor
    edited: torch.Tensor
    edit_norm: torch.Tensor
    steps: torch.Tensor
    failed: torch.Tensor
    margin_after: torch.Tensor
    edit_cosine: torch.Tensor | None = None
    prompt_fired: torch.Tensor | None = None
    prompt_edited: torch.Tensor | None = None


@dataclass
class TokenTrace:
    """One generated token of one row."""

    index: int
    token: str
    margins: list[float]
    fired: bool
    steered: bool
    edited: bool
    edit_norm: float
    steps: int
    failed: bool
    margin_after: float
    edit_cosine: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TraceSummary:
    """Counts over a row's generated tokens (and its prompt)."""

    tokens: int = 0
    fired_tokens: int = 0
    fired_steered: int = 0
    edited_tokens: int = 0
    prompt_fired: bool = False
    prompt_edited: int = 0
    failed_tokens: int = 0
    total_steps: int = 0
    mean_edit_norm: float = 0.0
    mean_edit_cosine: float = 0.0
    max_margin: float = float("-inf")
    top_facets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def row_trace(
    steps: list[TraceStep], row: int, tokens: list[str], facet_names: list[str]
) -> tuple[list[TokenTrace], TraceSummary]:
    """The trace of batch row ``row`` over its ``len(tokens)`` generated tokens (EOS excluded)."""
    by_index = {s.gen_index: s for s in steps}
    out: list[TokenTrace] = []
    summary = TraceSummary(tokens=len(tokens))
    for i, tok in enumerate(tokens):
        s = by_index.get(i)
        if s is None:
            continue
        m = s.margins[row].tolist()
        out.append(
            TokenTrace(
                i,
                tok,
                [round(x, 4) for x in m],
                bool(s.fired[row]),
                bool(s.steered[row]),
                bool(s.edited[row]),
                float(s.edit_norm[row]),
                int(s.steps[row]),
                bool(s.failed[row]),
                float(s.margin_after[row]),
                float(s.edit_cosine[row]) if s.edit_cosine is not None else 0.0,
            )
        )
    prefill = by_index.get(0)
    if prefill is not None and prefill.prompt_fired is not None and prefill.prompt_edited is not None:
        summary.prompt_fired = bool(prefill.prompt_fired[row])
        summary.prompt_edited = int(prefill.prompt_edited[row])
    summary.fired_tokens = sum(t.fired for t in out)
    summary.fired_steered = sum(t.fired and t.steered for t in out)
    summary.edited_tokens = sum(t.edited for t in out)
    summary.failed_tokens = sum(t.failed for t in out)
    summary.total_steps = sum(t.steps for t in out)
    norms = [t.edit_norm for t in out if t.edited]
    summary.mean_edit_norm = sum(norms) / len(norms) if norms else 0.0
    cosines = [t.edit_cosine for t in out if t.edited]
    summary.mean_edit_cosine = sum(cosines) / len(cosines) if cosines else 0.0
    if out:
        summary.max_margin = max(max(t.margins) for t in out)
        counts: dict[str, int] = {}
        for t in out:
            if t.fired:
                k = max(range(len(t.margins)), key=t.margins.__getitem__)
                counts[facet_names[k]] = counts.get(facet_names[k], 0) + 1
        summary.top_facets = sorted(counts, key=lambda n: -counts[n])[:3]
    return out, summary
