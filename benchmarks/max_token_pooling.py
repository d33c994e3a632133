"""Max-over-tokens pooling, held out: does a detector trained on last-token states find a harmful
request inside a long context when it is applied to every prompt token and the largest score kept?

One leave-one-out fold of ``sweep_detection.py`` (default ``wrapper:long_context``): the polytope is
trained on the sweep's last-token features at ``--layer`` without any row of the family (the default
training settings), thresholds flag 5 % / 1 % of the remaining validation benign rows, and the
family's train + validation rows are scored (the test split is never read). Last-token scoring and
max-over-prompt-tokens scoring use the same polytope, each with its own threshold. Per-token states
are read here (one forward per text, stopped after the layer); the last-token state is checked
against the sweep's stored feature.

    python benchmarks/max_token_pooling.py --sweep runs/sweep3 --fold wrapper:long_context
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sapguard.bench.run import provenance
from sapguard.data.records import read_jsonl
from sapguard.evaluate import generalisation_folds, recall_at_fpr
from sapguard.features.extract import encode_records, length_sorted_batches
from sapguard.features.hooks import left_pad
from sapguard.io import write_json
from sapguard.models.chat import resolve_template
from sapguard.models.layers import block_for_layer, unwrap_hidden
from sapguard.models.loading import load_model
from sapguard.polytope.train import TrainConfig, raw_scores, train_polytope

HERE = Path(__file__).resolve().parent


class _Stop(Exception):
    pass


def token_scores(lm, poly, records, rows: np.ndarray, layer: int, max_length: int, stored: torch.Tensor):
    """Per row: (score of the last token, max score over the prompt's own tokens and the last one)."""
    template = resolve_template(lm.tokenizer, "auto")
    encoded = encode_records(lm, [records[i] for i in rows], "mean_prompt", template, max_length)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["h"] = unwrap_hidden(output)
        raise _Stop

    handle = block_for_layer(lm.model, layer).register_forward_hook(hook)
    last, best, drift = np.zeros(len(rows)), np.zeros(len(rows)), 0.0
    try:
        for batch in length_sorted_batches(encoded, 16, 8192):
            inputs = left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
            with contextlib.suppress(_Stop), torch.inference_mode():
                lm.model(**inputs, use_cache=False)
            width = inputs["input_ids"].shape[1]
            for b, e in enumerate(batch):
                pos = sorted({width - len(e.ids) + p for p in e.positions} | {width - 1})
                h = captured["h"][b, pos].float()
                s = raw_scores(poly, h)
                last[e.record_index], best[e.record_index] = s[-1], s.max()
                ref = stored[rows[e.record_index]].float()
                drift = max(drift, float((h[-1].half().float() - ref).abs().max()))
    finally:
        handle.remove()
    return last, best, drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("runs/sweep3"))
    parser.add_argument("--fold", default="wrapper:long_context")
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--out", type=Path, default=HERE / "results_max_token_pooling.json")
    args = parser.parse_args()
    meta = json.loads((args.sweep / "meta.json").read_text())
    records = read_jsonl(args.sweep / "records.jsonl")
    stored = load_file(str(args.sweep / "features.safetensors"))["last"][:, meta["layers"].index(args.layer)]
    y = np.array([0 if r.is_safe else 1 for r in records])
    split = np.array([r.split for r in records])
    held = np.zeros(len(records), dtype=bool)
    held[generalisation_folds(records)[args.fold]] = True
    tr, va = (split == "train") & ~held, (split == "validation") & ~held
    x = stored.float()
    poly = train_polytope(x[tr], y[tr], x[va], y[va], TrainConfig()).polytope
    lm = load_model("default")
    start = time.perf_counter()
    benign_rows = np.flatnonzero(va & (y == 0))
    fold_rows = np.flatnonzero(held & np.isin(split, ["train", "validation"]))
    b_last, b_max, d1 = token_scores(lm, poly, records, benign_rows, args.layer, meta["max_length"], stored)
    f_last, f_max, d2 = token_scores(lm, poly, records, fold_rows, args.layer, meta["max_length"], stored)
    unsafe = y[fold_rows] == 1
    result: dict = {
        "fold": args.fold,
        "layer": args.layer,
        "n_fold": len(fold_rows),
        "n_unsafe": int(unsafe.sum()),
        "n_benign_calibration": len(benign_rows),
        "max_abs_drift_vs_sweep_last": max(d1, d2),
    }
    for name, bench, fold in (("last_token", b_last, f_last), ("max_over_tokens", b_max, f_max)):
        result[name] = {f"recall@{p}%": recall_at_fpr(bench, fold[unsafe], p / 100) for p in (1, 5)}
        result[name] |= {
            f"benign_flag_rate@{p}%": recall_at_fpr(bench, fold[~unsafe], p / 100) for p in (1, 5)
        }
    result |= {
        "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(sys.argv),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
