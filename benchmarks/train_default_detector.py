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

    python benchmarks/sweep_detection.py extract --out runs/sweep --layers 10,14,18,22 --max-length 512
    python benchmarks/sweep_detection.py select --out runs/sweep
    python benchmarks/train_default_detector.py --sweep runs/sweep --pooling mean --layer 18
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import read_jsonl
from sapguard.evaluate import evaluate, generalisation_report
from sapguard.features.extract import data_checksum
from sapguard.features.store import FeatureSet
from sapguard.models.loading import load_model
from sapguard.pipeline import train_from_features
from sapguard.polytope.artifact import DEFAULT_DETECTOR
from sapguard.polytope.train import TrainConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sweep_detection import commit  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--pooling", choices=tuple(POLICY), required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_DETECTOR)
    parser.add_argument("--loo-epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    fs = feature_set(args.sweep, args.pooling, args.layer)
    poly = train_from_features(fs, TrainConfig(), show_progress=True)
    poly.meta["training_data"]["features_dir"] = None
    poly.meta["max_length"] = fs.manifest["max_length"]
    poly.meta["trained_by"] = " ".join(["python", *sys.argv])
    poly.save_pretrained(args.out)
    print(f"saved {args.out}")
    in_dist = evaluate(poly, fs, split="test")
    general = generalisation_report(poly, fs, TrainConfig(epochs=args.loo_epochs, patience=4), show_progress=True)
    result = {
        "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "representation": {"pooling": args.pooling, "layer": args.layer, "max_length": fs.manifest["max_length"]},
        "in_distribution_test": in_dist,
        **general,
        "seconds": time.perf_counter() - start,
    }
    path = HERE / "results_detection.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    for name, row in general["leave_one_out"]["folds"].items():
        print(f"{name:40s} n={row['n']:5d} recall@1%={row['recall@1%']:.3f} recall@5%={row['recall@5%']:.3f} "
              f"benign_flagged@5%={row['benign_flag_rate@5%']:.3f}")


if __name__ == "__main__":
    main()
