"""Views of a prompt that a detector reads besides the whole prompt.

A wrapped request usually ends with the ask: a jailbreak persona then "answer my first question:
...", a document then "Task: ...", small talk then the request. The last-token state of the whole
prompt often loses it under the wrapper. The **tail view** is the prompt's last non-empty line,
without earlier chat turns, clipped to its last ``words`` words, read through the chat template as a
prompt of its own. A detector with ``views = ["prompt", "tail"]`` scores a text by the larger margin
of the two views (the held-out evidence is in the README, "Detection, measured on what training never
saw"); a prompt whose tail is the prompt itself is read once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from sapguard.data.records import Record
from sapguard.errors import SapError

VIEWS = ("prompt", "tail")
TAIL_WORDS = 64


def tail_view(prompt: str, words: int = TAIL_WORDS, *, has_history: bool = False) -> str | None:
    """The prompt's last non-empty line clipped to its last ``words`` words, or None when that is the
    whole prompt (and no earlier chat turns would be dropped by reading it alone)."""
    if words < 1:
        raise SapError(f"tail view: words must be at least 1, got {words}")
    lines = [line.strip() for line in prompt.strip().splitlines() if line.strip()]
    if not lines:
        return None
    tail = " ".join(lines[-1].split()[-words:])
    return tail if tail != prompt.strip() or has_history else None


def tail_records(records: Sequence[Record], words: int = TAIL_WORDS) -> dict[int, Record]:
    """``{row: tail view as a record}`` for the records that have one (same label, split and group)."""
    out = {}
    for i, r in enumerate(records):
        tail = tail_view(r.prompt, words, has_history=bool(r.history))
        if tail is not None:
            out[i] = replace(r, prompt=tail, history=())
    return out


def polytope_views(meta: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    """The views a polytope's config asks for (default: the whole prompt only) and the tail's words."""
    views = tuple(meta.get("views") or ("prompt",))
    unknown = [v for v in views if v not in VIEWS]
    if unknown or "prompt" not in views:
        raise SapError(f"polytope config: views {list(views)} must include 'prompt' and only name {', '.join(VIEWS)}")
    words = int(meta.get("tail_words") or TAIL_WORDS)
    if words < 1:
        raise SapError(f"polytope config: tail_words must be at least 1, got {words}")
    return views, words
