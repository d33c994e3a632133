"""Training the safety polytope on labelled features (METHOD.md, stage 2), with validation.

Objective per batch (unsafe is label 1):

    safe rows:    sum_k relu(kappa + v_k)
    unsafe rows:  unsafe_weight * relu(kappa - v_a)      a = the row's assigned facet
    + lambda_f * mean_rows ||f||_1 + lambda_phi * mean_k ||phi_k||_1

As in the reference code, the hinge terms are *summed* over the batch while the L1 terms are
means, so ``lambda_f`` and ``lambda_phi`` weigh the same as the published values at batch 128.

Facets are named after the category each specialises in
(:func:`sapguard.polytope.specialisation.name_facets`, mutual information) when the training
records carry categories.

Facet assignment: each unsafe row goes to its most violated facet, re-assigned greedily so that
unsafe rows spread over facets: rows are visited from the most to the least violated, and facet k's
score is ``v_k / s + entropy_weight * -log p_k`` where ``p_k`` is the (smoothed) share of unsafe rows
already assigned to k in this epoch and ``s`` the spread of the row's violations. As in the
reference, the entropy enters through the assignment only; it carries no gradient.

Added over the research code: a validation split used for early stopping (best validation AUROC)
and for calibrating a decision offset at a target false-positive rate.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.polytope.model import BATCH_ROWS, EncoderSpec, SafetyPolytope, read_in_batches
from sapguard.polytope.specialisation import name_facets

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Polytope training settings. :meth:`paper` gives the published ones (METHOD.md).

    The defaults were chosen on validation leave-one-out folds of the default corpus and model
    (held-out sources and wrapper families, README "Training settings and why"): four facets on the
    standardised hidden state (identity encoder), the logistic penalty, no L1 on the normals, and
    enough optimisation to converge. :meth:`concept_mlp` keeps the earlier defaults (16 facets on a
    1024-wide ReLU concept encoder, hinge), which the steering gate and target use.
    """

    num_facets: int = 4
    encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(kind="identity"))
    margin: float = 0.0
    unsafe_weight: float = 2.0
    loss: str = "logistic"
    lambda_f: float = 0.1
    lambda_phi: float = 0.0
    entropy_weight: float = 1.0
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 30
    patience: int = 30
    target_fpr: float = 0.05
    seed: int = 0

    @classmethod
    def concept_mlp(cls) -> TrainConfig:
        """16 facets on Linear(d -> 1024) + ReLU, hinge with margin 1, lambda 0.1, lr 1e-3, 40 epochs
        with early stopping (the defaults before the generalisation sweep; used for steering)."""
        return cls(
            num_facets=16,
            encoder=EncoderSpec(kind="mlp", width=1024, depth=1),
            margin=1.0,
            loss="hinge",
            lambda_phi=0.1,
            lr=1e-3,
            epochs=40,
            patience=8,
        )

    @classmethod
    def paper(cls, margin: float = 30.0, num_facets: int = 50) -> TrainConfig:
        """The published settings: Adam lr 1e-2, batch 128, F 16384, lambda_f 1, entropy 1, 1 epoch."""
        return cls(
            num_facets=num_facets,
            encoder=EncoderSpec(kind="mlp", width=16384, depth=1),
            margin=margin,
            unsafe_weight=2.0,
            loss="hinge",
            lambda_f=1.0,
            lambda_phi=1.0,
            entropy_weight=1.0,
            lr=1e-2,
            batch_size=128,
            epochs=1,
            patience=1,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["encoder"] = self.encoder.to_dict()
        return out


PRESETS = ("default", "concept-mlp", "paper")
"""Named training settings: ``default`` (chosen by held-out generalisation on the default model),
``concept-mlp`` (the earlier defaults, used for steering) and ``paper`` (published)."""


def train_config(
    preset: str = "default",
    *,
    encoder: str | None = None,
    width: int | None = None,
    depth: int | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Settings from a preset, with the given encoder shape and fields replaced (``None`` keeps the preset's).

    Args:
        preset: One of :data:`PRESETS`.
        encoder, width, depth: Concept encoder kind, width and depth.
        **overrides: :class:`TrainConfig` fields (``num_facets``, ``margin``, ``lr``...).

    Example:
        >>> train_config("paper", num_facets=8, lr=None).num_facets
        8
    """
    if preset not in PRESETS:
        raise SapError(f"unknown preset {preset!r}; expected {' or '.join(PRESETS)}")
    cfg = {"default": TrainConfig, "concept-mlp": TrainConfig.concept_mlp, "paper": TrainConfig.paper}[preset]()
    spec = EncoderSpec(kind=encoder or cfg.encoder.kind, width=width or cfg.encoder.width, depth=depth or cfg.encoder.depth)
    return replace(cfg, encoder=spec, **{k: v for k, v in overrides.items() if v is not None})


def train_config_of(poly: SafetyPolytope) -> TrainConfig:
    """The settings ``poly`` was trained with, read back from its config (to retrain it on other data)."""
    recorded = dict(poly.meta.get("train_config") or {})
    return TrainConfig(
        num_facets=poly.num_facets,
        encoder=poly.encoder.spec,
        **{k: v for k, v in recorded.items() if k not in ("encoder", "num_facets")},
    )


@dataclass
class TrainResult:
    """The trained polytope and what happened while training it."""

    polytope: SafetyPolytope
    history: list[dict[str, float]]
    best_epoch: int


def assign_facets(violations: torch.Tensor, usage: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """Greedy entropy-raising assignment of unsafe rows to facets.

    Args:
        violations: ``[n, K]`` violations of unsafe rows (no gradient needed).
        usage: ``[K]`` counts of rows assigned so far this epoch; updated in place.
        entropy_weight: 0 gives plain argmax; larger spreads rows over facets.

    Returns:
        ``[n]`` assigned facet per row.
    """
    v = violations.detach().float().cpu().numpy()
    n, k = v.shape
    assigned = np.empty(n, dtype=np.int64)
    if n == 0:
        return torch.from_numpy(assigned)
    spread = np.maximum(v.std(axis=1, keepdims=True), 1e-6) if k > 1 else np.ones((n, 1), dtype=np.float32)
    normalised = v / spread
    counts = usage.double().numpy().copy()
    for i in np.argsort(-v.max(axis=1), kind="stable"):
        share = (counts + 1.0) / (counts.sum() + k)
        a = int(np.argmax(normalised[i] - entropy_weight * np.log(share)))
        assigned[i] = a
        counts[a] += 1
    usage.copy_(torch.from_numpy(counts))
    return torch.from_numpy(assigned)


LOSSES = {"hinge": torch.relu, "logistic": torch.nn.functional.softplus}
"""Penalty on a signed violation: the paper's hinge, or its smooth logistic surrogate (every row
keeps a gradient, as in logistic regression, instead of only rows inside the margin)."""


def polytope_loss(
    poly: SafetyPolytope, h: torch.Tensor, y: torch.Tensor, assigned: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """The SaP objective on one batch (``y`` = 1 for unsafe; ``assigned`` indexes unsafe rows)."""
    f = poly.concepts(h)
    v = poly.violations_from_concepts(f)
    safe, unsafe = y == 0, y == 1
    penalty = LOSSES[cfg.loss]
    loss = penalty(cfg.margin + v[safe]).sum(dim=1).sum()
    if unsafe.any():
        v_a = v[unsafe].gather(1, assigned[:, None]).squeeze(1)
        loss = loss + cfg.unsafe_weight * penalty(cfg.margin - v_a).sum()
    loss = loss + cfg.lambda_f * f.abs().sum(dim=-1).mean() + cfg.lambda_phi * poly.phi.abs().sum(dim=-1).mean()
    return loss


def raw_scores(poly: SafetyPolytope, x: torch.Tensor, batch: int = BATCH_ROWS) -> np.ndarray:
    """``max_k v_k`` for each row (before the offset)."""
    poly.eval()
    if len(x) == 0:
        return np.zeros(0)
    return read_in_batches(poly, x, margins=False, batch_size=batch).max(dim=1).values.numpy()


def calibrate_offset(safe_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold whose false-positive rate on ``safe_scores`` is at most ``target_fpr``."""
    if len(safe_scores) == 0:
        raise SapError("validation split has no safe rows; cannot calibrate a threshold")
    if not 0 <= target_fpr < 1:
        raise SapError(f"target FPR must be in [0, 1), got {target_fpr}")
    return float(np.quantile(safe_scores, 1 - target_fpr, method="higher"))


def fit_risk(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Platt scaling of margins to a probability of unsafe: ``sigmoid(a * margin + b)``."""
    if len(set(labels.tolist())) < 2:
        return {"a": 1.0, "b": 0.0}
    lr = LogisticRegression(C=1e4).fit(scores[:, None], labels)
    return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")


def _check_inputs(x: torch.Tensor, y: np.ndarray, name: str) -> None:
    if len(x) == 0:
        raise SapError(f"{name} split is empty")
    if not torch.isfinite(x).all():
        raise SapError(f"{name} features contain NaN or Inf")
    if len(x) != len(y):
        raise SapError(f"{name}: {len(x)} feature rows but {len(y)} labels")


def train_polytope(
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_val: torch.Tensor,
    y_val: np.ndarray,
    cfg: TrainConfig | None = None,
    *,
    train_records: Sequence[Record] | None = None,
    meta: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> TrainResult:
    """Train a polytope with early stopping on validation AUROC, then calibrate and name facets.

    Args:
        x_train, y_train: Training features ``[n, d]`` and labels (1 = unsafe).
        x_val, y_val: Validation features and labels (model selection and calibration only).
        cfg: Settings (default :class:`TrainConfig`).
        train_records: Row-aligned records of ``x_train``; their categories name the facets
            (:func:`sapguard.polytope.specialisation.name_facets`).
        meta: Recorded in the artifact (base model, layer, policy...).
    """
    cfg = cfg or TrainConfig()
    if cfg.loss not in LOSSES:
        raise SapError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
    _check_inputs(x_train, y_train, "train")
    _check_inputs(x_val, y_val, "validation")
    if len(set(y_train.tolist())) < 2:
        raise SapError("training data needs both safe and unsafe rows")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x_train = x_train.float()
    poly = SafetyPolytope(x_train.shape[1], cfg.num_facets, cfg.encoder, meta=meta)
    poly.encoder.mean.copy_(x_train.mean(0))
    poly.encoder.scale.copy_(x_train.std(0).clamp_min(1e-6))
    y = torch.as_tensor(y_train, dtype=torch.long)
    opt = torch.optim.Adam(poly.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(x_train) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    history: list[dict[str, float]] = []
    best_state, best_auc, best_epoch, stale = copy.deepcopy(poly.state_dict()), -1.0, 0, 0
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not show_progress)
    for epoch in bar:
        poly.train()
        usage = torch.zeros(cfg.num_facets)
        total = 0.0
        for idx in torch.randperm(len(x_train), generator=generator).split(cfg.batch_size):
            h, yb = x_train[idx], y[idx]
            with torch.no_grad():
                v_unsafe = poly(h[yb == 1])
            assigned = assign_facets(v_unsafe, usage, cfg.entropy_weight)
            loss = polytope_loss(poly, h, yb, assigned, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += float(loss.detach())
        if not np.isfinite(total):
            raise SapError("training diverged (NaN loss); lower --lr or --margin")
        val_auc = auroc(y_val, raw_scores(poly, x_val.float()))
        p = usage / usage.sum().clamp_min(1)
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        history.append({"epoch": epoch + 1, "loss": total / len(x_train), "val_auroc": val_auc, "usage_entropy": entropy})
        bar.set_postfix(loss=f"{total / len(x_train):.3f}", val_auroc=f"{val_auc:.3f}")
        if val_auc > best_auc + 1e-4:
            best_state, best_auc, best_epoch, stale = copy.deepcopy(poly.state_dict()), val_auc, epoch + 1, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                logger.info("early stop after epoch %d (best %d)", epoch + 1, best_epoch)
                break
    poly.load_state_dict(best_state)
    poly.eval()
    _calibrate(poly, x_val.float(), y_val, cfg.target_fpr)
    if train_records is not None:
        name_facets(poly, x_train, y_train, train_records)
    poly.meta.update({"train_config": cfg.to_dict(), "best_epoch": best_epoch, "history": history})
    return TrainResult(poly, history, best_epoch)


def _calibrate(poly: SafetyPolytope, x_val: torch.Tensor, y_val: np.ndarray, target_fpr: float) -> None:
    calibrate_scores(poly, raw_scores(poly, x_val), y_val, target_fpr)


def calibrate_scores(poly: SafetyPolytope, scores: np.ndarray, y_val: np.ndarray, target_fpr: float) -> None:
    """Set the decision offset and the risk calibration from validation ``scores`` (``max_k v_k`` of each
    row as the polytope will read it, e.g. the larger of two views) and their labels."""
    offset = calibrate_offset(scores[y_val == 0], target_fpr)
    poly.offset.fill_(offset)
    poly.meta["calibration"] = {
        "offset": offset,
        "target_fpr": target_fpr,
        "risk": fit_risk(scores - offset, y_val),
        "split": "validation",
    }


def facet_assignments(poly: SafetyPolytope, x: torch.Tensor) -> np.ndarray:
    """Most violated facet per row."""
    return read_in_batches(poly, x, margins=False).argmax(dim=1).numpy()
