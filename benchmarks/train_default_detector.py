"""Train, evaluate and ship the default detection polytope (package data, ``sap detect`` default).

Takes the features of ``benchmarks/sweep_detection.py extract`` (every default-corpus text, read
once at several layers with two poolings) and the representation the sweep selected on
validation folds, then:

1. trains the polytope on the train split (early stopping and calibration on validation);
2. reports the test split once: in-distribution metrics with the probe baselines, leave-one-out
   (held-out unsafe sources and wrapper families, one retrained polytope per fold) and per-source
   operating points at 1 % and 5 % FPR thresholds calibrated on validation;
3. saves the artifact to ``src/sapguard/assets/detector`` and the numbers, with the commit and
   command, to ``benchmarks/results_detection.json``.

With ``--tail DIR`` (the tail views of ``benchmarks/tail_view.py extract``), the detector also reads
each prompt's last line on its own (``views = ["prompt", "tail"]``): the same polytope, its threshold
and risk calibrated on validation with the larger score of the two views, and every table above
scored that way (leave-one-out folds retrained with :func:`sapguard.evaluate.max_view_trainer`); the
in-distribution table adds the prompt view alone.

    python benchmarks/sweep_detection.py extract --out runs/sweep --layers 10,14,18,22 --max-length 512
    python benchmarks/sweep_detection.py select --out runs/sweep
    python benchmarks/tail_view.py extract --sweep runs/sweep --out runs/tail
    python benchmarks/train_default_detector.py --sweep runs/sweep --pooling last --layer 22 --tail runs/tail
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import read_jsonl
from sapguard.evaluate import (
    binary_metrics,
    evaluate,
    generalisation_report,
    leave_one_out,
    max_view_trainer,
    operating_points,
)
from sapguard.features.extract import data_checksum
from sapguard.features.store import FeatureSet
from sapguard.features.views import tail_records
from sapguard.models.loading import load_model
from sapguard.pipeline import train_from_features
from sapguard.polytope.artifact import DEFAULT_DETECTOR
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import TrainConfig, auroc, calibrate_scores, raw_scores, train_polytope

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sweep_detection import commit, parse_candidate  # noqa: E402

POLICY = {"last": "last_prompt", "mean": "mean_prompt"}


def feature_set(sweep: Path, pooling: str, layer: int) -> FeatureSet:
    """The sweep's features at one (pooling, layer) as a :class:`FeatureSet`, checked against the corpus."""
    meta = json.loads((sweep / "meta.json").read_text())
    records = read_jsonl(sweep / "records.jsonl")
    corpus = build_default_corpus()
    if data_checksum(records) != data_checksum(corpus):
        raise SystemExit(f"{sweep}: features were extracted from another version of the corpus; rerun the extract step")
    x = load_file(str(sweep / "features.safetensors"))[pooling][:, meta["layers"].index(layer)].float()
    identity = load_model("default").identity()
    manifest = {
        "model": {"id": identity["id"], "revision": identity["revision"]},
        "hidden_size": identity["hidden_size"],
        "num_layers": identity["num_layers"],
        "layer": layer,
        "policy": POLICY[pooling],
        "template": "chat",
        "max_length": meta["max_length"],
        "data_sha256": data_checksum(corpus),
    }
    n = len(records)
    return FeatureSet(x, torch.arange(n), torch.zeros(n, dtype=torch.long), records, manifest)


def tail_features(tail_dir: Path, fs: FeatureSet) -> tuple[torch.Tensor, int]:
    """The tail view's features of every row (a row without one repeats its prompt view), checked
    against the rows' texts, and the tail's word count."""
    meta = json.loads((tail_dir / "meta.json").read_text())
    if meta["layer"] != fs.manifest["layer"]:
        raise SystemExit(f"{tail_dir}: tail views read at layer {meta['layer']}, the detector reads {fs.manifest['layer']}")
    data = load_file(str(tail_dir / "tail.safetensors"))
    expected = sorted(tail_records(fs.records, meta["words"]))
    if data["has_tail"].nonzero().flatten().tolist() != expected:
        raise SystemExit(f"{tail_dir}: its tail views are not those of these records; rerun tail_view.py extract")
    return torch.where(data["has_tail"][:, None], data["tail"].float(), fs.features.float()), int(meta["words"])


def view_scores(poly: SafetyPolytope, x: torch.Tensor, x_tail: torch.Tensor) -> np.ndarray:
    return np.maximum(raw_scores(poly, x), raw_scores(poly, x_tail))


def tail_report(poly: SafetyPolytope, fs: FeatureSet, x_tail: torch.Tensor, cfg: TrainConfig, in_dist: dict) -> dict:  # type: ignore[type-arg]
    """The generalisation tables and in-distribution metrics with both views read (test split reported once)."""
    x, y, split = fs.features.float(), fs.labels, np.array([r.split for r in fs.records])
    va, te = split == "validation", split == "test"
    loo = leave_one_out(torch.cat([x, x_tail], dim=1), y, fs.records, fit=max_view_trainer(cfg, x.shape[1]),
                        report="test", show_progress=True)
    s_va, s_te = view_scores(poly, x[va], x_tail[va]), view_scores(poly, x[te], x_tail[te])
    records_te = [r for r, t in zip(fs.records, te) if t]
    ops = operating_points(s_va, y[va], s_te, y[te], records_te)
    detectors = {"polytope (prompt + tail views)": binary_metrics(y[te], s_te, float(poly.offset))}
    detectors.update({("polytope (prompt view only)" if k == "polytope" else k): v for k, v in in_dist["detectors"].items()})
    return {"leave_one_out": loo, "operating_points_test": ops, "in_distribution_test": {**in_dist, "detectors": detectors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--pooling", choices=tuple(POLICY), required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_DETECTOR)
    parser.add_argument("--tail", type=Path, help="tail views of tail_view.py extract: the detector reads them too")
    parser.add_argument("--config", default="", help="TrainConfig overrides as chosen by the sweep, e.g. 'loss=logistic,num_facets=4'")
    args = parser.parse_args()
    start = time.perf_counter()
    _, overrides = parse_candidate("|" + args.config)
    cfg = replace(TrainConfig(), **overrides)
    fs = feature_set(args.sweep, args.pooling, args.layer)
    poly = train_from_features(fs, cfg, show_progress=True)
    poly.meta["training_data"]["features_dir"] = None
    poly.meta["max_length"] = fs.manifest["max_length"]
    poly.meta["trained_by"] = " ".join(["python", *sys.argv])
    x_tail = None
    if args.tail:
        x_tail, words = tail_features(args.tail, fs)
        x_va, y_va, _ = fs.subset("validation")
        prompt_only = float(poly.offset)
        in_dist = evaluate(poly, fs, split="test")  # prompt view only, at its own calibration
        va = np.array([r.split == "validation" for r in fs.records])
        s_va = view_scores(poly, x_va.float(), x_tail[va])
        calibrate_scores(poly, s_va, y_va, cfg.target_fpr)
        poly.meta.update({"views": ["prompt", "tail"], "tail_words": words,
                          "validation_metrics": binary_metrics(y_va, s_va, float(poly.offset))})
        print(f"threshold with the tail view: {prompt_only:.3f} -> {float(poly.offset):.3f}")
    else:
        in_dist = evaluate(poly, fs, split="test")
    poly.save_pretrained(args.out)
    print(f"saved {args.out}")
    # The published settings (F 16384, lambda 1, lr 1e-2, 1 epoch; kappa 30 and 5 as for Qwen2 and
    # Ministral), on the same features, for the README's comparison (validation only).
    x_tr, y_tr, _ = fs.subset("train")
    x_va, y_va, _ = fs.subset("validation")
    paper = {}
    for margin in (30.0, 5.0):
        p = train_polytope(x_tr, y_tr, x_va, y_va, TrainConfig.paper(margin=margin)).polytope
        paper[f"kappa_{margin:g}"] = auroc(y_va, raw_scores(p, x_va))
    if x_tail is not None:
        general = tail_report(poly, fs, x_tail, cfg, in_dist)
        in_dist = general.pop("in_distribution_test")
    else:
        general = generalisation_report(poly, fs, cfg, show_progress=True)
    result = {
        "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "representation": {"pooling": args.pooling, "layer": args.layer, "max_length": fs.manifest["max_length"],
                           "views": poly.meta.get("views", ["prompt"])},
        "train_config": cfg.to_dict(),
        "in_distribution_test": in_dist,
        "paper_preset_validation_auroc": paper,
        **general,
        "seconds": time.perf_counter() - start,
    }
    path = HERE / "results_detection.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (args.out / "GENERALISATION.md").write_text(headline_markdown(result), encoding="utf-8")
    print(f"wrote {path} and {args.out / 'GENERALISATION.md'}")
    print(headline_markdown(result))


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.2f}"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def headline_markdown(result: dict) -> str:  # type: ignore[type-arg]
    """The generalisation tables (leave-one-out and per-source operating points) as markdown."""
    loo = result["leave_one_out"]["folds"]
    lines = [
        f"Shipped detector: {result['representation']}; commit {result['commit']}, {result['date']}.",
        "",
        "**Held out of training** (one polytope retrained per row without any row of that source or wrapper "
        "family; threshold from the remaining validation benign rows; the held-out rows of the test split "
        "scored; 95 % Wilson interval on recall at 5 % FPR):",
        "",
        "| held out | test rows (unsafe) | recall @1 % FPR | recall @5 % FPR | 95 % CI | wrapped benign flagged @5 % |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, r in loo.items():
        lo, hi = wilson(round(r["recall@5%"] * r["n_unsafe"]), r["n_unsafe"]) if r["n_unsafe"] else (float("nan"),) * 2
        lines.append(
            f"| {name} | {r['n']} ({r['n_unsafe']}) | {_f(r['recall@1%'])} | {_f(r['recall@5%'])} | "
            f"{_f(lo)}-{_f(hi)} | {_f(r['benign_flag_rate@5%'])} |"
        )
    ops = result["operating_points_test"]
    lines += [
        "",
        "**This detector on the test split**, thresholds calibrated on validation benign rows:",
        "",
        "| group | test rows | unsafe recall @5 % | benign flagged @1 % | benign flagged @5 % |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in ops.items():
        lines.append(f"| {name} | {r['n']} | {_f(r['recall@5%'])} | {_f(r['benign_flag_rate@1%'])} | {_f(r['benign_flag_rate@5%'])} |")
    det = result["in_distribution_test"]["detectors"]
    lines += ["", "**In distribution** (test split, threshold from validation):", "",
              "| detector | precision | recall | F1 | FPR | AUROC |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in det.items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['fpr']:.3f} | {m['auroc']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
