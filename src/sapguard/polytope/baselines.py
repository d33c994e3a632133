"""Detectors behind one interface: the polytope and the baselines it is compared with.

Each detector is fitted on training features, selects its settings and calibrates its threshold on
validation features only (at the same target false-positive rate), and scores rows so that
higher means more unsafe.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import calibrate_offset, raw_scores


class Detector(Protocol):
    """A fitted binary detector (unsafe = 1)."""

    name: str
    threshold: float

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> None: ...

    def scores(self, x: np.ndarray) -> np.ndarray: ...


class PolytopeDetector:
    """An already trained polytope seen as a detector (threshold = its calibrated offset)."""

    name = "polytope"

    def __init__(self, poly: SafetyPolytope):
        self.poly = poly
        self.threshold = float(poly.offset)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> None:
        """Already trained by :func:`sapguard.polytope.train.train_polytope`."""

    def scores(self, x: np.ndarray) -> np.ndarray:
        return raw_scores(self.poly, torch.as_tensor(x, dtype=torch.float32))


class _SklearnProbe:
    """Pick the regularisation with the best validation AUROC, then calibrate on validation."""

    name = "probe"
    grid: tuple[float, ...] = ()

    def __init__(self, target_fpr: float = 0.05, seed: int = 0):
        self.target_fpr = target_fpr
        self.seed = seed
        self.threshold = 0.0
        self.model: Pipeline | None = None

    def build(self, value: float) -> Pipeline:
        raise NotImplementedError

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> None:
        best = -1.0
        for value in self.grid:
            model = self.build(value).fit(x_train, y_train)
            auc = roc_auc_score(y_val, model.predict_proba(x_val)[:, 1])
            if auc > best:
                best, self.model = auc, model
        self.threshold = calibrate_offset(self.scores(x_val)[y_val == 0], self.target_fpr)

    def scores(self, x: np.ndarray) -> np.ndarray:
        assert self.model is not None, "fit first"
        return self.model.decision_function(x) if hasattr(self.model, "decision_function") else self.model.predict_proba(x)[:, 1]


class LogisticProbe(_SklearnProbe):
    """Standardised logistic regression on the hidden state (L2, C chosen on validation)."""

    name = "logistic_probe"
    grid = (0.001, 0.01, 0.1, 1.0)

    def build(self, value: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=value, max_iter=2000))


class MLPProbe(_SklearnProbe):
    """Standardised one-hidden-layer MLP (256 units, L2 alpha chosen on validation)."""

    name = "mlp_probe"
    grid = (1e-3, 1e-1, 1.0)

    def build(self, value: float) -> Pipeline:
        mlp = MLPClassifier(hidden_layer_sizes=(256,), alpha=value, max_iter=300, random_state=self.seed)
        return make_pipeline(StandardScaler(), mlp)

    def scores(self, x: np.ndarray) -> np.ndarray:
        assert self.model is not None, "fit first"
        p = np.clip(self.model.predict_proba(x)[:, 1], 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))


BASELINES = {"logistic_probe": LogisticProbe, "mlp_probe": MLPProbe}
