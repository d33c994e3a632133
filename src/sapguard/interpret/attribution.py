"""Word attribution: which words move a facet's violation most when left out (on the real model)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sapguard.detect import base_model_for, margins_for
from sapguard.errors import SapError
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope

MarginFn = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class WordScore:
    """One word of the text.

    Attributes:
        word: The word as written.
        start, end: Character span in the text.
        delta: Margin of the full text minus margin without this word: positive means the word
            pushes the text towards violating the facet.
    """

    word: str
    start: int
    end: int
    delta: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def facet_index(poly: SafetyPolytope, facet: str | int) -> int:
    """Index of a facet given by name or index."""
    names = poly.facet_names
    if isinstance(facet, int) or (isinstance(facet, str) and facet.isdigit()):
        k = int(facet)
        if not 0 <= k < len(names):
            raise SapError(f"facet index {k} out of range 0..{len(names) - 1}")
        return k
    if facet not in names:
        raise SapError(f"unknown facet {facet!r}; facets are {', '.join(names)}")
    return names.index(facet)


def leave_one_out(text: str, facet: int, margins: MarginFn) -> tuple[float, list[WordScore]]:
    """Leave-one-word-out attribution with any margins function ``texts -> [n, K]``.

    All variants (the full text and one per removed word) go through ``margins`` in one call.

    Returns:
        The full text's margin on ``facet`` and one :class:`WordScore` per word.
    """
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if not spans:
        raise SapError("attribution needs a non-empty text")
    variants = [text] + [
        " ".join(text[s:e] for j, (s, e) in enumerate(spans) if j != i) or " " for i in range(len(spans))
    ]
    values = margins(variants)[:, facet].tolist()
    base = values[0]
    return base, [WordScore(text[s:e], s, e, base - v) for (s, e), v in zip(spans, values[1:])]


def word_attribution(
    poly: SafetyPolytope, text: str, facet: str | int, *, lm: LoadedModel | None = None, batch_size: int = 32
) -> tuple[float, list[WordScore]]:
    """Leave-one-word-out attribution of ``text`` for one facet on the polytope's base model.

    Args:
        poly: The polytope.
        text: A prompt.
        facet: Facet name or index.
        lm: The base model (default: the one recorded in the polytope, loaded once).

    Returns:
        The full text's margin and per-word scores (see :class:`WordScore`).

    Example:
        >>> margin, words = word_attribution(poly, "How do I build a pipe bomb?", "violence")  # doctest: +SKIP
        >>> max(words, key=lambda w: w.delta).word  # doctest: +SKIP
        'bomb?'
    """
    k = facet_index(poly, facet)
    lm = lm or base_model_for(poly)
    return leave_one_out(text, k, lambda texts: margins_for(poly, lm, texts, batch_size=batch_size))


def highlight_html(text: str, words: Sequence[WordScore]) -> str:
    """The text as HTML, each word shaded by its score: red raises the violation, blue lowers it."""
    scale = max((abs(w.delta) for w in words), default=0.0) or 1.0
    parts, pos = [], 0
    for w in words:
        parts.append(html.escape(text[pos : w.start]))
        alpha = min(1.0, abs(w.delta) / scale) * 0.8
        colour = f"rgba(220,40,40,{alpha:.2f})" if w.delta > 0 else f"rgba(40,90,220,{alpha:.2f})"
        parts.append(
            f'<span class="word" style="background:{colour}" title="{w.delta:+.3f}">{html.escape(w.word)}</span>'
        )
        pos = w.end
    parts.append(html.escape(text[pos:]))
    return f'<p class="attribution">{"".join(parts)}</p>'
