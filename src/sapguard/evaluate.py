"""Honest detection metrics: unsafe is the positive class; thresholds come from validation data."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from sapguard.data.records import Record
from sapguard.features.store import FeatureSet
from sapguard.polytope.baselines import BASELINES, Detector, PolytopeDetector
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import facet_assignments


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1, FPR at ``threshold`` and AUROC / PR-AUC of ``scores``."""
    pred = scores > threshold
    pos = labels == 1
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(set(labels.tolist())) == 2
    return {
        "n": int(len(labels)),
        "n_unsafe": int(pos.sum()),
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
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
        det = BASELINES[name](target_fpr=fpr)
        det.fit(x_train.numpy(), y_train, x_val.numpy(), y_val)
        detectors.append(det)
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
