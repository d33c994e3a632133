"""Windowed reading of long inputs and leave-one-out generalisation folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapguard.data.records import Record
from sapguard.detect import scan, split_windows
from sapguard.errors import SapError
from sapguard.evaluate import generalisation_folds, leave_one_out, recall_at_fpr
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from tests.conftest import make_tiny

FILLER = "how do i bake bread cake write poem story about history".split()


def planted(lm, trigger: str = "bomb") -> SafetyPolytope:
    """A one-facet polytope that fires on the mean layer-1 state when ``trigger`` is in the window.

    The trigger's embedding gets a large value on coordinate 0; the facet reads coordinate 0.
    """
    tok_id = lm.tokenizer.convert_tokens_to_ids(trigger)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[tok_id].zero_()
        lm.model.model.embed_tokens.weight[tok_id, 0] = 60.0
    poly = SafetyPolytope(
        32, 1, EncoderSpec(kind="identity"),
        meta={"layer": 1, "policy": "mean_prompt", "template": "chat", "base_model": {"id": lm.model_id}},
    )
    with torch.no_grad():
        poly.phi.zero_()
        poly.phi[0, 0] = 1.0
        poly.xi.fill_(0.5)
    return poly.eval()


def long_text(n_words: int, trigger_at: int | None) -> str:
    words = [FILLER[i % len(FILLER)] for i in range(n_words)]
    if trigger_at is not None:
        words[trigger_at] = "bomb"
    return " ".join(words)


def test_windowed_reading_finds_a_request_in_the_middle_of_a_long_input() -> None:
    lm = make_tiny("llama")
    poly = planted(lm)
    text = long_text(200, trigger_at=100)
    (one_pass,) = scan(poly, [text], lm=lm, window=1000)
    windowed, clean = scan(poly, [text, long_text(200, None)], lm=lm, window=40)
    # read in one pass, the trigger is diluted in the mean over 200 tokens and missed
    assert one_pass.windows == 1 and one_pass.is_safe
    # read in windows of 40 tokens, the window holding it fires; the verdict says how it was read
    assert windowed.windows > 1 and not windowed.is_safe
    assert clean.windows == windowed.windows and clean.is_safe


def test_windows_overlap_and_cover_the_text() -> None:
    lm = make_tiny("llama")
    text = long_text(100, None)
    windows = split_windows(lm, text, 30)
    assert len(windows) == 6  # starts 0, 15, ..., 60 and a last window ending at the text's end
    assert all(len(w.split()) == 30 for w in windows)
    assert windows[0].split()[:1] == text.split()[:1] and windows[-1].split()[-1] == text.split()[-1]
    assert split_windows(lm, "how do i bake bread", 30) == ["how do i bake bread"]
    with pytest.raises(SapError, match="window must be at least 8"):
        split_windows(lm, text, 4)


def test_a_million_characters_is_refused_with_one_line() -> None:
    lm = make_tiny("llama")
    poly = planted(lm)
    with pytest.raises(SapError, match=r"text 2: 1000000 characters exceeds the limit of 200000"):
        scan(poly, ["how do i bake bread", "a" * 1_000_000], lm=lm)


def _records() -> list[Record]:
    rows = []
    for i in range(600):
        source = ("a", "b", "c")[i % 3]
        split = ("train", "train", "train", "train", "validation", "test")[(i // 3) % 6]
        wrapper = "cipher/rot13" if i % 5 == 0 else None
        rows.append(Record(f"text {i}", is_safe=(i // 7) % 2 == 0, source=source, split=split, wrapper=wrapper))
    return rows


def test_folds_hold_out_a_source_with_its_wrapped_rows_and_a_wrapper_family() -> None:
    rows = _records()
    folds = generalisation_folds(rows)
    assert set(folds) == {"source:a", "source:b", "source:c", "wrapper:cipher"}
    assert {rows[i].source for i in folds["source:a"]} == {"a"}
    assert len(folds["source:a"]) == 200  # plain and wrapped rows of source a
    assert all(rows[i].wrapper == "cipher/rot13" for i in folds["wrapper:cipher"])


def test_leave_one_out_never_trains_on_the_held_out_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    import sapguard.polytope.train as train_mod

    rows = _records()
    y = np.array([0 if r.is_safe else 1 for r in rows])
    torch.manual_seed(0)
    x = torch.randn(len(rows), 8)
    x[:, 1] = torch.as_tensor(y, dtype=torch.float32) * 3.0  # a separable signal
    row_of = {tuple(v): i for i, v in enumerate(x.tolist())}
    seen: list[set[int]] = []
    real = train_mod.train_polytope

    def spy(x_tr, y_tr, x_val, y_val, cfg=None, **kw):
        seen.append({row_of[tuple(v)] for v in x_tr.tolist() + x_val.tolist()})
        return real(x_tr, y_tr, x_val, y_val, cfg, **kw)

    monkeypatch.setattr(train_mod, "train_polytope", spy)
    cfg = train_mod.TrainConfig(epochs=30, lr=1e-2, encoder=EncoderSpec(width=16), num_facets=2)
    report = leave_one_out(x, y, rows, cfg, report="test")
    folds = generalisation_folds(rows)
    assert list(report["folds"]) == list(folds)
    for used, (name, idx) in zip(seen, folds.items()):
        assert used.isdisjoint(set(idx.tolist())), name
        assert all(rows[i].split != "test" for i in used)
        assert report["folds"][name]["n"] == sum(rows[i].split == "test" for i in idx)
    assert report["folds"]["source:a"]["recall@5%"] > 0.9  # the planted signal transfers


def test_recall_at_fpr() -> None:
    benign = np.arange(100, dtype=float)
    assert recall_at_fpr(benign, np.array([96.5, 97.5, 10.0]), 0.05) == pytest.approx(2 / 3)
    assert np.isnan(recall_at_fpr(benign, np.array([]), 0.05))


def _binary_metrics_by_hand(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """The counts-by-hand implementation binary_metrics had before it used sklearn's confusion matrix."""
    pred = scores > threshold
    pos = labels == 1
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(labels),
        "n_unsafe": int(pos.sum()),
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
    }


def test_binary_metrics_equal_the_counts_by_hand() -> None:
    from sapguard.evaluate import binary_metrics

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, n), rng.normal(size=n), t) for n in (1, 2, 7, 50, 300) for t in (-0.5, 0.0, 0.7)]
    cases += [(np.zeros(9, dtype=int), rng.normal(size=9), 0.0), (np.ones(9, dtype=int), rng.normal(size=9), 0.0)]
    cases += [(np.array([0, 1, 1]), np.array([-1.0, -2.0, -3.0]), 5.0), (np.zeros(0, dtype=int), np.zeros(0), 0.0)]
    for labels, scores, threshold in cases:
        got, want = binary_metrics(labels, scores, threshold), _binary_metrics_by_hand(labels, scores, threshold)
        for key, value in want.items():
            assert (np.isnan(value) and np.isnan(got[key])) or abs(got[key] - value) <= 1e-12, (key, got[key], value)
