"""Honest detection metrics: unsafe is the positive class; thresholds come from validation data."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.features.store import FeatureSet
from sapguard.polytope.baselines import BASELINES, Detector, PolytopeDetector
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import facet_assignments


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1, FPR at ``threshold`` and AUROC / PR-AUC of ``scores``."""
    pred = scores > threshold
    pos = labels == 1
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(pos, pred, labels=[False, True]).ravel()) if len(labels) else (0,) * 4
    both = len(set(labels.tolist())) == 2
    return {
        "n": len(labels),
        "n_unsafe": int(pos.sum()),
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, scores)) if both else float("nan"),
    }


def per_category_recall(records: Sequence[Record], labels: np.ndarray, pred: np.ndarray) -> dict[str, dict[str, float]]:
    """Recall on unsafe rows of each category (a multi-label row counts for each of its categories)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, label, p in zip(records, labels, pred):
        if label == 1:
            for category in record.categories or ("uncategorised",):
                hits[category].append(bool(p))
    return {c: {"n": len(h), "recall": float(np.mean(h))} for c, h in sorted(hits.items())}


def per_source(records: Sequence[Record], labels: np.ndarray, pred: np.ndarray) -> dict[str, dict[str, float]]:
    """Per source: rows, unsafe rows, recall on unsafe rows and flag rate on safe rows."""
    out: dict[str, dict[str, float]] = {}
    for source in sorted({r.source for r in records}):
        idx = np.array([r.source == source for r in records])
        unsafe, safe = idx & (labels == 1), idx & (labels == 0)
        out[source] = {
            "n": int(idx.sum()),
            "n_unsafe": int(unsafe.sum()),
            "recall": float(pred[unsafe].mean()) if unsafe.any() else float("nan"),
            "fpr": float(pred[safe].mean()) if safe.any() else float("nan"),
        }
    return out


def recall_at_fpr(benign_scores: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Share of ``scores`` above the threshold that flags ``fpr`` of ``benign_scores``.

    Used both for recall (``scores`` of unsafe rows) and for the flag rate of other benign rows.
    """
    if len(scores) == 0 or len(benign_scores) == 0:
        return float("nan")
    threshold = np.quantile(benign_scores, 1 - fpr, method="higher")
    return float((scores > threshold).mean())


def generalisation_folds(records: Sequence[Record], min_unsafe: int = 20) -> dict[str, np.ndarray]:
    """Held-out groups for leave-one-out evaluation: row indices per fold.

    ``source:<name>`` holds out every row of one source that has unsafe rows (its plain rows and
    every wrapped version of them); ``wrapper:<family>`` holds out every row made with one wrapper
    family (harmful and benign alike). Folds with fewer than ``min_unsafe`` unsafe rows are left out.
    """
    from sapguard.data.augment import wrapper_family

    folds: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        folds[f"source:{r.source}"].append(i)
        family = wrapper_family(r)
        if family is not None:
            folds[f"wrapper:{family}"].append(i)
    out = {}
    for name in sorted(folds):
        idx = np.array(folds[name])
        if sum(not records[i].is_safe for i in idx) >= min_unsafe:
            out[name] = idx
    return out


Scorer = Callable[[torch.Tensor], np.ndarray]
"""Feature rows ``[n, d]`` -> one unsafety score per row (higher is more unsafe)."""

Trainer = Callable[[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray], Scorer]
"""``(x_train, y_train, x_val, y_val) -> Scorer``: fits a detector on one fold's training rows."""


def polytope_trainer(cfg: Any = None) -> Trainer:
    """The default :data:`Trainer` of :func:`leave_one_out`: a polytope trained with ``cfg``, scored by
    its largest raw violation (:func:`sapguard.polytope.train.raw_scores`)."""

    def fit(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        from sapguard.polytope import train

        poly = train.train_polytope(x_tr, y_tr, x_va, y_va, cfg or train.TrainConfig()).polytope
        return lambda x: train.raw_scores(poly, x)

    return fit


def max_view_trainer(cfg: Any = None, dim: int | None = None) -> Trainer:
    """A polytope fitted on the prompt view, scored by the larger of its two views' scores.

    Rows are ``[prompt-view features | tail-view features]`` (``dim`` columns each; a row without a
    tail view repeats its prompt view, see :mod:`sapguard.features.views`); fitting and early stopping
    use the prompt view only, as the shipped detector is trained.
    """
    base = polytope_trainer(cfg)

    def fit(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        d = dim if dim is not None else x_tr.shape[1] // 2
        score = base(x_tr[:, :d], y_tr, x_va[:, :d], y_va)
        return lambda z: np.maximum(score(z[:, :d]), score(z[:, d : 2 * d]))

    return fit


def leave_one_out(
    x: torch.Tensor,
    y: np.ndarray,
    records: Sequence[Record],
    cfg: Any = None,
    *,
    fit: Trainer | None = None,
    report: str = "test",
    fprs: Sequence[float] = (0.01, 0.05),
    folds: dict[str, np.ndarray] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Generalisation to what training never saw: one detector per held-out source or wrapper family.

    For each fold of :func:`generalisation_folds`, a detector is fitted on the *train* rows outside
    the fold (and may early-stop on the *validation* rows outside it), its thresholds for each
    false-positive rate in ``fprs`` are set on those validation rows' benign scores, and the fold's
    rows are scored: those in the test split (``report="test"``), or those in train and validation
    (``report="validation"``, for model selection; the test split is then never read).

    Args:
        cfg: ``TrainConfig`` of the polytope trained per fold (the default detector, see
            :func:`polytope_trainer`).
        fit: Any other detector (e.g. a probe baseline) to run through the same folds, fits and
            thresholds instead of the polytope; not together with ``cfg``.

    Returns:
        ``{"folds": {name: {n, n_unsafe, recall@1%, recall@5%, benign_flag_rate@...}}, "summary": ...}``;
        a fold's ``benign_flag_rate`` is the share of its benign rows flagged (wrapped benign
        requests for a wrapper fold).
    """
    from tqdm.auto import tqdm

    if report not in ("test", "validation"):
        raise ValueError(f"report must be 'test' or 'validation', got {report!r}")
    if fit is not None and cfg is not None:
        raise ValueError("pass cfg (for the polytope) or fit (any detector), not both")
    fit = fit or polytope_trainer(cfg)
    split = np.array([r.split for r in records])
    in_report = split == "test" if report == "test" else np.isin(split, ["train", "validation"])
    folds = generalisation_folds(records) if folds is None else folds
    out: dict[str, Any] = {}
    for name, idx in tqdm(folds.items(), desc="leave-one-out", disable=not show_progress):
        held = np.zeros(len(records), dtype=bool)
        held[idx] = True
        tr, va = (split == "train") & ~held, (split == "validation") & ~held
        target = held & in_report
        if not target.any() or not (tr & (y == 1)).any():
            continue
        score = fit(x[tr], y[tr], x[va], y[va])
        benign_val = score(x[va & (y == 0)])
        scores = score(x[target])
        labels = y[target]
        row: dict[str, Any] = {"n": int(target.sum()), "n_unsafe": int(labels.sum()), "trained_on_rows": int(tr.sum())}
        for fpr in fprs:
            tag = f"{round(fpr * 100)}%"
            row[f"recall@{tag}"] = recall_at_fpr(benign_val, scores[labels == 1], fpr)
            row[f"benign_flag_rate@{tag}"] = recall_at_fpr(benign_val, scores[labels == 0], fpr)
        both = len(set(labels.tolist())) == 2
        row["auroc"] = float(roc_auc_score(labels, scores)) if both else float("nan")
        out[name] = row
    summary = {}
    for fpr in fprs:
        tag = f"recall@{round(fpr * 100)}%"
        values = [r[tag] for r in out.values() if r["n_unsafe"] and not np.isnan(r[tag])]
        summary[f"mean_{tag}"] = float(np.mean(values)) if values else float("nan")
        summary[f"min_{tag}"] = float(np.min(values)) if values else float("nan")
    return {"report_split": report, "target_fprs": list(fprs), "folds": out, "summary": summary}


def operating_points(
    scores_val: np.ndarray, y_val: np.ndarray, scores: np.ndarray, y: np.ndarray, records: Sequence[Record],
    fprs: Sequence[float] = (0.01, 0.05),
) -> dict[str, Any]:
    """Per source (and per wrapper family), recall or benign flag rate at validation-calibrated thresholds.

    Thresholds flag ``fpr`` of the validation benign rows; rates are measured on ``scores``.
    """
    from sapguard.data.augment import wrapper_family

    out: dict[str, Any] = {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[f"source:{r.source}"].append(i)
        family = wrapper_family(r)
        groups[f"wrapper:{family or 'none'}"].append(i)
    benign_val = scores_val[y_val == 0]
    for name in sorted(groups):
        idx = np.array(groups[name])
        row: dict[str, Any] = {"n": len(idx), "n_unsafe": int(y[idx].sum())}
        for fpr in fprs:
            tag = f"{round(fpr * 100)}%"
            row[f"recall@{tag}"] = recall_at_fpr(benign_val, scores[idx][y[idx] == 1], fpr)
            row[f"benign_flag_rate@{tag}"] = recall_at_fpr(benign_val, scores[idx][y[idx] == 0], fpr)
        out[name] = row
    return out


def generalisation_report(
    poly: SafetyPolytope,
    features: FeatureSet,
    cfg: Any = None,
    *,
    fprs: Sequence[float] = (0.01, 0.05),
    show_progress: bool = False,
) -> dict[str, Any]:
    """The headline metrics: held-out sources and wrapper families, and per-source operating points.

    ``leave_one_out`` retrains one polytope per fold with ``cfg`` (the test split's rows of the
    held-out fold are scored); ``operating_points`` scores ``poly`` itself on the test split at
    thresholds calibrated on validation benign rows, per source and per wrapper family.
    """
    from sapguard.polytope.train import raw_scores

    if len(features) != len(set(features.record_index.tolist())):
        raise SapError("generalisation needs one feature row per text (token policy last_prompt or mean_prompt)")
    records = [features.records[i] for i in features.record_index.tolist()]
    x, y = features.features.float(), features.labels
    loo = leave_one_out(x, y, records, cfg, report="test", fprs=fprs, show_progress=show_progress)
    x_val, y_val, _ = features.subset("validation")
    x_test, y_test, rec_test = features.subset("test")
    ops = operating_points(raw_scores(poly, x_val.float()), y_val, raw_scores(poly, x_test.float()), y_test, rec_test, fprs)
    return {"leave_one_out": loo, "operating_points_test": ops}


def evaluate(
    poly: SafetyPolytope,
    features: FeatureSet,
    *,
    split: str = "test",
    baselines: Sequence[str] = tuple(BASELINES),
    target_fpr: float | None = None,
) -> dict[str, Any]:
    """Evaluate the polytope and baselines (trained here on the train split) on ``split``.

    The baselines are fitted on the same training features and calibrated on the same validation
    split at the polytope's target false-positive rate.
    """
    x_test, y_test, rec_test = features.subset(split)
    x_train, y_train, _ = features.subset("train")
    x_val, y_val, _ = features.subset("validation")
    fpr = target_fpr if target_fpr is not None else (poly.meta.get("calibration") or {}).get("target_fpr", 0.05)
    detectors: list[Detector] = [PolytopeDetector(poly)]
    for name in baselines:
        probe = BASELINES[name](target_fpr=fpr)
        probe.fit(x_train.numpy(), y_train, x_val.numpy(), y_val)
        detectors.append(probe)
    table: dict[str, Any] = {}
    poly_pred = None
    for det in detectors:
        s = det.scores(x_test.numpy())
        table[det.name] = binary_metrics(y_test, s, det.threshold)
        if det.name == "polytope":
            poly_pred = s > det.threshold
    assert poly_pred is not None
    assigned = facet_assignments(poly, torch.as_tensor(x_test, dtype=torch.float32))
    names = poly.facet_names
    usage = Counter(names[k] for k, p in zip(assigned, poly_pred) if p)
    return {
        "split": split,
        "target_fpr": fpr,
        "detectors": table,
        "per_category_recall": per_category_recall(rec_test, y_test, poly_pred),
        "per_source": per_source(rec_test, y_test, poly_pred),
        "facet_usage": dict(usage.most_common()),
    }


def metrics_table(result: dict[str, Any]) -> str:
    """The detectors side by side as a markdown table."""
    cols = ("accuracy", "precision", "recall", "f1", "fpr", "auroc", "pr_auc")
    lines = ["| detector | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in result["detectors"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
