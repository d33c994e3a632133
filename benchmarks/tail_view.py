"""Tail view, held out: does reading the prompt's last line on its own find requests that a template,
a document or earlier chat turns hide from the last-token state?

Many wrapped prompts end with the ask (a jailbreak persona then "answer my first question: ...", a
document then "Task: ...", small talk then the request). The *tail view* of a prompt is its last
non-empty line, without earlier chat turns, clipped to its last ``--words`` words, read through the
chat template as a prompt of its own. A row is scored by the larger of the two margins (whole prompt,
tail); rows whose tail is the whole prompt keep their one score.

Step ``extract`` reads the tail view's last-token state at ``--layer`` for every row of a
``sweep_detection.py`` extraction whose tail differs from its prompt. Step ``select`` runs the
sweep's validation leave-one-out folds (the test split is never read) for: the last token alone (the
shipped detector's recipe), max(last, tail) with the same polytope, and max(last, tail) with a
polytope also trained on the tail views of the train rows (labelled by their request). Each scoring
gets its own thresholds, from the remaining validation benign rows scored the same way.

    python benchmarks/tail_view.py extract --sweep runs/sweep3 --out runs/tail3
    python benchmarks/tail_view.py select --sweep runs/sweep3 --out runs/tail3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sapguard.bench.run import provenance
from sapguard.data.records import read_jsonl
from sapguard.evaluate import Scorer, leave_one_out, max_view_trainer, polytope_trainer
from sapguard.features.extract import encode_records, extract_features
from sapguard.features.views import tail_records
from sapguard.io import write_json
from sapguard.models.chat import resolve_template
from sapguard.models.loading import load_model
from sapguard.polytope.train import TrainConfig

HERE = Path(__file__).resolve().parent


def extract(sweep: Path, out: Path, layer: int, words: int, max_length: int) -> None:
    records = read_jsonl(sweep / "records.jsonl")
    views = tail_records(records, words)
    rows = sorted(views)
    lm = load_model("default")
    template = resolve_template(lm.tokenizer, "auto")
    tokens = sum(len(e.ids) for e in encode_records(lm, [views[i] for i in rows], "last_prompt", template, max_length))
    start = time.perf_counter()
    x, index, _ = extract_features(lm, [views[i] for i in rows], layer, policy="last_prompt", template=template,
                                   max_length=max_length, show_progress=True)
    at = torch.tensor(rows)[index]
    tail = torch.zeros(len(records), lm.hidden_size, dtype=torch.float16)
    has = torch.zeros(len(records), dtype=torch.bool)
    tail[at], has[at] = x.half(), True
    out.mkdir(parents=True, exist_ok=True)
    save_file({"tail": tail, "has_tail": has}, str(out / "tail.safetensors"))
    meta = {"layer": layer, "words": words, "max_length": max_length, "rows": len(rows), "tokens": tokens,
            "seconds": time.perf_counter() - start, "sweep": str(sweep)}
    (out / "meta.json").write_text(json.dumps(meta))
    print(f"{len(rows)} tail views of {len(records)} rows, {tokens} tokens, {meta['seconds']:.0f}s")


def tails_too_trainer(cfg: TrainConfig, dim: int):
    """As :func:`max_view_trainer`, the polytope also fitted on the train rows' tail views (extra rows,
    labelled by their request)."""
    base = polytope_trainer(cfg)

    def fit(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        keep = x_tr[:, -1] > 0
        rows = torch.cat([x_tr[:, :dim], x_tr[keep, dim : 2 * dim]])
        score = base(rows, np.concatenate([y_tr, y_tr[keep.numpy()]]), x_va[:, :dim], y_va)
        return lambda z: np.maximum(score(z[:, :dim]), score(z[:, dim : 2 * dim]))

    return fit


def last_only_trainer(cfg: TrainConfig, dim: int):
    """The shipped recipe: fit and score the last-token state (the first ``dim`` columns) alone."""
    base = polytope_trainer(cfg)

    def fit(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        score = base(x_tr[:, :dim], y_tr, x_va[:, :dim], y_va)
        return lambda z: score(z[:, :dim])

    return fit


def select(sweep: Path, out: Path, layer: int) -> None:
    records = read_jsonl(sweep / "records.jsonl")
    meta = json.loads((sweep / "meta.json").read_text())
    last = load_file(str(sweep / "features.safetensors"))["last"][:, meta["layers"].index(layer)].float()
    views = load_file(str(out / "tail.safetensors"))
    has = views["has_tail"]
    tail = torch.where(has[:, None], views["tail"].float(), last)
    x = torch.cat([last, tail, has.float()[:, None]], dim=1)
    y = np.array([0 if r.is_safe else 1 for r in records])
    cfg, dim = TrainConfig(), last.shape[1]
    results = {"provenance": provenance(sys.argv), "layer": layer, "tail": json.loads((out / "meta.json").read_text()),
               "candidates": {}}
    candidates = {
        "last token": last_only_trainer(cfg, dim),
        "max(last, tail), same polytope": max_view_trainer(cfg, dim),
        "max(last, tail), trained on tails too": tails_too_trainer(cfg, dim),
    }
    for name, fit in candidates.items():
        start = time.perf_counter()
        loo = leave_one_out(x, y, records, fit=fit, report="validation", fprs=(0.01, 0.05))
        folds = loo["folds"]
        recall = [f["recall@5%"] for f in folds.values()]
        gap = [f["recall@5%"] - np.nan_to_num(f["benign_flag_rate@5%"]) for f in folds.values()]
        results["candidates"][name] = {"mean_recall@5%": float(np.mean(recall)),
                                       "mean_recall_minus_benign_flag@5%": float(np.mean(gap)),
                                       "folds": folds, "seconds": time.perf_counter() - start}
        print(f"{name}: held-out recall@5% {np.mean(recall):.3f}, minus benign flag {np.mean(gap):.3f}", flush=True)
        for fold, row in folds.items():
            print(f"  {fold:36s} recall@5% {row['recall@5%']:.2f}  benign flagged {row['benign_flag_rate@5%']:.2f}")
        write_json(HERE / "results_tail_view.json", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("extract", "select"))
    parser.add_argument("--sweep", type=Path, default=Path("runs/sweep3"))
    parser.add_argument("--out", type=Path, default=Path("runs/tail3"))
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--words", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    if args.step == "extract":
        extract(args.sweep, args.out, args.layer, args.words, args.max_length)
    else:
        select(args.sweep, args.out, args.layer)


if __name__ == "__main__":
    main()
