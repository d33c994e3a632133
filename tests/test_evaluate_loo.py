"""One leave-one-out fold loop (``sapguard.evaluate.leave_one_out``) for the polytope and for the
probe baseline of ``benchmarks/sweep_detection.py``: neither trains on the held-out group, and the
outputs are the ones the two separate loops gave before they were merged."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from sapguard import evaluate
from sapguard.data.records import Record
from sapguard.evaluate import Scorer, Trainer, generalisation_folds, leave_one_out, recall_at_fpr
from sapguard.polytope.model import EncoderSpec
from sapguard.polytope.train import TrainConfig, raw_scores, train_polytope

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_detection.py"
CFG = TrainConfig(epochs=8, lr=1e-2, encoder=EncoderSpec(width=8), num_facets=2, patience=8)


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sweep_detection", SWEEP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data() -> tuple[torch.Tensor, np.ndarray, list[Record]]:
    rows = []
    for i in range(300):
        source = ("a", "b", "c")[i % 3]
        split = ("train", "train", "train", "validation", "validation", "test")[(i // 3) % 6]
        wrapper = "cipher/rot13" if i % 5 == 0 else None
        rows.append(Record(f"text {i}", is_safe=(i // 7) % 2 == 0, source=source, split=split, wrapper=wrapper))
    y = np.array([0 if r.is_safe else 1 for r in rows])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(rows), 6, generator=generator)
    x[:, 1] += torch.as_tensor(y, dtype=torch.float32) * 1.5  # a signal, not a perfect one
    return x, y, rows


def _recording(fit: Trainer, x: torch.Tensor, fitted: list[set[int]]) -> Trainer:
    """``fit``, noting which rows of ``x`` each fold trained (or early-stopped) on."""
    row_of = {tuple(v): i for i, v in enumerate(x.tolist())}

    def spy(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        fitted.append({row_of[tuple(v)] for v in x_tr.tolist() + x_va.tolist()})
        return fit(x_tr, y_tr, x_va, y_va)

    return spy


def _assert_never_trained_on_the_held_out_group(fitted: list[set[int]], rows: list[Record]) -> None:
    folds = generalisation_folds(rows)
    assert len(fitted) == len(folds)
    for used, (name, idx) in zip(fitted, folds.items()):
        assert used, name
        assert used.isdisjoint(idx.tolist()), name
        assert all(rows[i].split != "test" for i in used), name  # test rows are never trained on
        if name.startswith("source:"):
            assert name.removeprefix("source:") not in {rows[i].source for i in used}


def test_polytope_path_goes_through_the_one_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, rows = _data()
    fitted: list[set[int]] = []
    real = evaluate.polytope_trainer
    monkeypatch.setattr(evaluate, "polytope_trainer", lambda cfg=None: _recording(real(cfg), x, fitted))
    report = leave_one_out(x, y, rows, CFG, report="validation")
    _assert_never_trained_on_the_held_out_group(fitted, rows)
    assert list(report["folds"]) == list(generalisation_folds(rows))


def test_probe_path_goes_through_the_one_loop(sweep: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, rows = _data()
    fitted: list[set[int]] = []
    loops: list[dict[str, Any]] = []
    real_probe = sweep.probe_trainer

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        loops.append(kwargs)
        return leave_one_out(*args, **kwargs)

    monkeypatch.setattr(sweep, "leave_one_out", counted)
    monkeypatch.setattr(sweep, "probe_trainer", lambda c: _recording(real_probe(c), x, fitted))
    sweep.probe_leave_one_out(x, y, rows, 0.1)
    assert len(loops) == 1 and loops[0]["report"] == "validation"
    _assert_never_trained_on_the_held_out_group(fitted, rows)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _probe_loop_before(x: torch.Tensor, y: np.ndarray, records: list[Record], c: float) -> dict[str, object]:
    """``sweep_detection.probe_leave_one_out`` as it was, with its own copy of the fold loop."""
    split = np.array([r.split for r in records])
    rows = {}
    for name, idx in generalisation_folds(records).items():
        held = np.zeros(len(y), dtype=bool)
        held[idx] = True
        tr, va = (split == "train") & ~held, (split == "validation") & ~held
        target = held & np.isin(split, ["train", "validation"])
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        model = LogisticRegression(C=c, max_iter=3000).fit(((x[tr] - mu) / sd).numpy(), y[tr])
        benign_val, scores = (model.decision_function(((z - mu) / sd).numpy()) for z in (x[va & (y == 0)], x[target]))
        labels = y[target]
        rows[name] = {
            "n": int(target.sum()),
            "n_unsafe": int(labels.sum()),
            "recall@5%": recall_at_fpr(benign_val, scores[labels == 1], 0.05),
            "benign_flag_rate@5%": recall_at_fpr(benign_val, scores[labels == 0], 0.05),
        }
    return {"folds": rows}


def test_probe_output_is_unchanged(sweep: ModuleType) -> None:
    x, y, rows = _data()
    before = _probe_loop_before(x, y, rows, 0.1)
    after = sweep.probe_leave_one_out(x, y, rows, 0.1)
    assert _same(before, after), (before, after)
    assert sweep.held_out_scores(after) == sweep.held_out_scores(before)


def _polytope_loop_before(x: torch.Tensor, y: np.ndarray, records: list[Record], cfg: TrainConfig, report: str) -> dict[str, Any]:
    """The fold body ``leave_one_out`` had before it took a trainer (polytope only)."""
    from sklearn.metrics import roc_auc_score

    split = np.array([r.split for r in records])
    in_report = split == "test" if report == "test" else np.isin(split, ["train", "validation"])
    out: dict[str, Any] = {}
    for name, idx in generalisation_folds(records).items():
        held = np.zeros(len(records), dtype=bool)
        held[idx] = True
        tr, va = (split == "train") & ~held, (split == "validation") & ~held
        target = held & in_report
        if not target.any() or not (tr & (y == 1)).any():
            continue
        poly = train_polytope(x[tr], y[tr], x[va], y[va], cfg).polytope
        benign_val = raw_scores(poly, x[va & (y == 0)])
        scores = raw_scores(poly, x[target])
        labels = y[target]
        row: dict[str, Any] = {"n": int(target.sum()), "n_unsafe": int(labels.sum()), "trained_on_rows": int(tr.sum())}
        for fpr in (0.01, 0.05):
            tag = f"{round(fpr * 100)}%"
            row[f"recall@{tag}"] = recall_at_fpr(benign_val, scores[labels == 1], fpr)
            row[f"benign_flag_rate@{tag}"] = recall_at_fpr(benign_val, scores[labels == 0], fpr)
        both = len(set(labels.tolist())) == 2
        row["auroc"] = float(roc_auc_score(labels, scores)) if both else float("nan")
        out[name] = row
    return out


@pytest.mark.parametrize("report", ["test", "validation"])
def test_polytope_output_is_unchanged(report: str) -> None:
    x, y, rows = _data()
    before = _polytope_loop_before(x, y, rows, CFG, report)
    after = leave_one_out(x, y, rows, CFG, report=report)
    assert _same(before, after["folds"]), (before, after["folds"])


def test_cfg_and_fit_are_exclusive() -> None:
    x, y, rows = _data()
    with pytest.raises(ValueError, match="not both"):
        leave_one_out(x, y, rows, CFG, fit=evaluate.polytope_trainer(CFG))
