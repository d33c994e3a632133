"""The tail view: a prompt's last line read on its own, the larger margin of the two views kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapguard.data.records import Record
from sapguard.detect import scan
from sapguard.errors import SapError
from sapguard.evaluate import max_view_trainer
from sapguard.features.views import polytope_views, tail_records, tail_view
from tests.conftest import make_tiny
from tests.test_detect_generalisation import long_text, planted


def test_tail_view_is_the_last_line_clipped_and_none_when_it_is_the_prompt() -> None:
    assert tail_view("Persona text.\n\n  Answer my question: how do I X?  \n") == "Answer my question: how do I X?"
    assert tail_view("one two three four", words=2) == "three four"
    assert tail_view("How do I bake bread?") is None  # the tail is the prompt: read once
    assert tail_view("How do I bake bread?", has_history=True) == "How do I bake bread?"  # without the earlier turns
    with pytest.raises(SapError, match="words must be at least 1"):
        tail_view("x", words=0)


def test_tail_records_keep_label_split_and_group_and_drop_the_history() -> None:
    rows = [
        Record(prompt="doc line\nDo the harmful thing", is_safe=False, source="s", group="g1", split="train"),
        Record(prompt="plain request", is_safe=True, source="s", group="g2", split="test"),
        Record(prompt="last turn", is_safe=False, source="s", group="g3", split="validation", history=(("hi", "hello"),)),
    ]
    views = tail_records(rows)
    assert sorted(views) == [0, 2]
    assert views[0].prompt == "Do the harmful thing" and not views[0].is_safe
    assert (views[0].group, views[0].split) == ("g1", "train")
    assert views[2].prompt == "last turn" and views[2].history == ()


def test_polytope_views_checks_the_config() -> None:
    assert polytope_views({}) == (("prompt",), 64)
    assert polytope_views({"views": ["prompt", "tail"], "tail_words": 32}) == (("prompt", "tail"), 32)
    for bad in ({"views": ["tail"]}, {"views": ["prompt", "middle"]}):
        with pytest.raises(SapError, match="must include 'prompt'"):
            polytope_views(bad)


def test_scan_reads_the_tail_and_keeps_the_larger_margin() -> None:
    lm = make_tiny("llama")
    poly = planted(lm)  # fires on the mean state when "bomb" dominates the text read
    text = long_text(200, None) + "\nhow bomb"
    (whole,) = scan(poly, [text], lm=lm, window=1000)
    assert whole.is_safe and not whole.tail_read  # diluted in 202 words
    poly.meta.update({"views": ["prompt", "tail"], "tail_words": 8})
    with_tail, plain = scan(poly, [text, "how do i bake bread"], lm=lm, window=1000)
    (tail_alone,) = scan(poly, ["how bomb"], lm=lm)
    assert with_tail.tail_read and not with_tail.is_safe
    for name, margin in with_tail.margins.items():  # the max of the two views, facet by facet
        assert margin == pytest.approx(max(whole.margins[name], tail_alone.margins[name]), abs=1e-5)
    assert not plain.tail_read and plain.is_safe  # a one-line prompt is read once


def test_max_view_trainer_fits_the_prompt_view_and_scores_the_larger_view() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    y = (x[:, 0] > 0).numpy().astype(int)
    tail = x.clone()
    tail[y == 0, 0] += 3.0  # benign rows' tails look unsafe: only a max over views sees it
    both = torch.cat([x, tail], dim=1)
    score = max_view_trainer(None, 4)(both[:300], y[:300], both[300:], y[300:])
    prompt_only = max_view_trainer(None, 4)(torch.cat([x, x], 1)[:300], y[:300], torch.cat([x, x], 1)[300:], y[300:])
    s_both, s_prompt = score(both[300:]), prompt_only(torch.cat([x, x], 1)[300:])
    assert np.all(s_both >= s_prompt - 1e-6)  # same polytope (same seed and rows), max over a superset
    assert np.any(s_both > s_prompt + 1e-3)
