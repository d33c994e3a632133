"""Would the never-seen PyRIT collections help as training data? A validation-style experiment.

The prompt view (last token, layer 22, as the shipped detector's first view) of the corpus
(``sweep_detection.py extract`` output, reused) and of the PyRIT collections outside the corpus
(``sapguard.data.labelled_sources``, rows not in the corpus). The red-team objectives are split in two
halves by near-duplicate group (SHA-256 of the group id); a polytope with the shipped settings is
trained on the corpus's train split (A) and on that plus the many-shot requests and the first half
(B). Both are calibrated at 5 % FPR on the corpus's validation benign rows and scored on the second
half (never in training) and on the corpus's validation split. The corpus test split is never read.

    python benchmarks/external_training.py --sweep runs/sweep4 --out runs/ext
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from external_detection import external_rows
from safetensors.torch import load_file
from train_default_detector import wilson

from sapguard.bench.run import provenance
from sapguard.data.records import read_jsonl
from sapguard.data.splits import assign_groups
from sapguard.features.extract import extract_features
from sapguard.io import write_json
from sapguard.models.loading import load_model
from sapguard.polytope.artifact import default_polytope
from sapguard.polytope.train import auroc, calibrate_offset, raw_scores, train_config_of, train_polytope

HERE = Path(__file__).resolve().parent


def rates(scores: np.ndarray, y: np.ndarray, offset: float) -> dict[str, object]:
    flagged = scores > offset
    k, n = int(flagged[y == 1].sum()), int((y == 1).sum())
    kb, nb = int(flagged[y == 0].sum()), int((y == 0).sum())
    return {"recall": k / n, "recall_ci95": wilson(k, n), "safe_flagged": kb / nb, "safe_flagged_ci95": wilson(kb, nb),
            "auroc": auroc(y, scores), "unsafe": n, "safe": nb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("runs/sweep4"))
    parser.add_argument("--out", type=Path, default=Path("runs/ext"))
    parser.add_argument("--results", type=Path, default=HERE / "results_external_training.json")
    args = parser.parse_args()
    meta = json.loads((args.sweep / "meta.json").read_text())
    records = read_jsonl(args.sweep / "records.jsonl")
    x = load_file(str(args.sweep / "features.safetensors"))["last"][:, meta["layers"].index(22)].float()
    y = np.array([0 if r.is_safe else 1 for r in records])
    split = np.array([r.split for r in records])
    rows, _ = external_rows()
    cache = args.out / "external_last22.pt"
    if cache.exists():
        xe = torch.load(cache)
    else:
        xe, index, _ = extract_features(load_model("default"), rows, 22, policy="last_prompt", template="chat",
                                        max_length=meta["max_length"], show_progress=True)
        assert index.tolist() == list(range(len(rows)))
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(xe, cache)
    ye = np.array([0 if r.is_safe else 1 for r in rows])
    grouped = assign_groups(rows)
    half = np.array([int(hashlib.sha256(str(g.group).encode()).hexdigest(), 16) % 2 for g in grouped])
    scorer = np.array([r.source == "pyrit/scorer_objectives" for r in rows])
    add = ~scorer | (half == 0)
    held = scorer & (half == 1)
    cfg = train_config_of(default_polytope())
    tr, va = split == "train", split == "validation"
    out: dict[str, object] = {"provenance": provenance(["python", *sys.argv]), "config": str(cfg)}
    for name, (xt, yt) in {
        "A: corpus train": (x[tr], y[tr]),
        "B: + many-shot + half of the red-team objectives": (torch.cat([x[tr], xe[add]]), np.concatenate([y[tr], ye[add]])),
    }.items():
        torch.manual_seed(0)
        poly = train_polytope(xt, yt, x[va], y[va], cfg).polytope
        s_va = raw_scores(poly, x[va])
        offset = calibrate_offset(s_va[y[va] == 0], 0.05)
        s_held = raw_scores(poly, xe[held])
        out[name] = {"train_rows": len(yt), "held_out_red_team_half": rates(s_held, ye[held], offset),
                     "corpus_validation": rates(s_va, y[va], offset)}
        print(name, json.dumps(out[name]), flush=True)
    write_json(args.results, out)


if __name__ == "__main__":
    main()
