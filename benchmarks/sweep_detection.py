"""Representation sweep for the default detector: layers x token pooling, chosen by generalisation.

Step ``extract`` reads every default-corpus text once (one forward pass, stopped after the highest
layer) and stores the last-prompt-token state and the mean over the prompt's own tokens at each
layer of ``--layers`` (float16, ``runs/sweep/features.safetensors``).

Step ``select`` uses **train and validation rows only** (the test split is never read):

1. in-distribution: train on train, validation AUROC, for every (layer, pooling);
2. leave-one-out on validation folds for the best candidates: for each unsafe source and each
   wrapper family, train on the train rows of everything else, calibrate the threshold on the
   validation benign rows that remain (5 % FPR), and measure recall on the held-out group's
   train+validation rows. The score of a representation is its mean held-out recall.

Writes ``benchmarks/results_sweep_detection.json`` with the commit and command.

    python benchmarks/sweep_detection.py extract --out runs/sweep
    python benchmarks/sweep_detection.py select --out runs/sweep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import read_jsonl, write_jsonl
from sapguard.evaluate import leave_one_out
from sapguard.features.extract import encode_records, length_sorted_batches
from sapguard.features.hooks import left_pad
from sapguard.models.chat import resolve_template
from sapguard.models.layers import block_for_layer, unwrap_hidden
from sapguard.models.loading import load_model
from sapguard.polytope.train import TrainConfig, auroc, raw_scores, train_polytope

HERE = Path(__file__).resolve().parent


class _Stop(Exception):
    pass


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@torch.inference_mode()
def extract(out: Path, layers: list[int], max_length: int) -> None:
    records = build_default_corpus()
    lm = load_model("default")
    template = resolve_template(lm.tokenizer, "auto")
    encoded = encode_records(lm, records, "mean_prompt", template, max_length)
    assert len(encoded) == len(records)
    captured: dict[int, torch.Tensor] = {}
    top = max(layers)

    def make_hook(layer: int):  # noqa: ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            captured[layer] = unwrap_hidden(output)
            if layer == top:
                raise _Stop

        return hook

    handles = [block_for_layer(lm.model, layer).register_forward_hook(make_hook(layer)) for layer in layers]
    last = torch.zeros(len(records), len(layers), lm.hidden_size, dtype=torch.float16)
    mean = torch.zeros_like(last)
    start = time.perf_counter()
    tokens = 0
    try:
        for batch in tqdm(length_sorted_batches(encoded, 32, 8192), desc="extract", unit="batch"):
            inputs = left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
            tokens += int(inputs["attention_mask"].sum())
            with contextlib.suppress(_Stop):
                lm.model(**inputs, use_cache=False)
            width = inputs["input_ids"].shape[1]
            for b, e in enumerate(batch):
                pos = [width - len(e.ids) + p for p in e.positions]
                for j, layer in enumerate(layers):
                    h = captured[layer][b]
                    last[e.record_index, j] = h[width - 1].half()
                    mean[e.record_index, j] = h[pos].float().mean(0).half()
    finally:
        for h in handles:
            h.remove()
    out.mkdir(parents=True, exist_ok=True)
    save_file({"last": last, "mean": mean}, str(out / "features.safetensors"))
    write_jsonl(out / "records.jsonl", records)
    elapsed = time.perf_counter() - start
    (out / "meta.json").write_text(json.dumps({"layers": layers, "max_length": max_length, "tokens": tokens, "seconds": elapsed}))
    print(f"extracted {len(records)} texts, {tokens} tokens in {elapsed:.0f}s ({tokens / elapsed:.0f} tok/s)")


def _fit(x: torch.Tensor, y: np.ndarray, tr: np.ndarray, va: np.ndarray, epochs: int, seed: int = 0):  # noqa: ANN202
    cfg = TrainConfig(epochs=epochs, patience=4, seed=seed)
    return train_polytope(x[tr], y[tr], x[va], y[va], cfg).polytope


def select(out: Path, epochs: int, top_k: int) -> None:
    data = load_file(str(out / "features.safetensors"))
    meta = json.loads((out / "meta.json").read_text())
    records = read_jsonl(out / "records.jsonl")
    y = np.array([0 if r.is_safe else 1 for r in records])
    split = np.array([r.split for r in records])
    tr, va = split == "train", split == "validation"
    results: dict[str, object] = {
        "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "layers": meta["layers"],
        "in_distribution": {},
        "leave_one_out_validation": {},
    }
    scores = {}
    for pooling in ("last", "mean"):
        for j, layer in enumerate(meta["layers"]):
            x = data[pooling][:, j].float()
            poly = _fit(x, y, tr, va, epochs)
            key = f"{pooling}@{layer}"
            scores[key] = auroc(y[va], raw_scores(poly, x[va]))
            results["in_distribution"][key] = {"val_auroc": scores[key]}  # type: ignore[index]
            print(f"{key}: validation AUROC {scores[key]:.4f}", flush=True)
    best = sorted(scores, key=lambda k: -scores[k])[:top_k]
    for key in best:
        pooling, layer = key.split("@")
        x = data[pooling][:, meta["layers"].index(int(layer))].float()
        loo = leave_one_out(x, y, records, TrainConfig(epochs=epochs, patience=4), report="validation", show_progress=True)
        results["leave_one_out_validation"][key] = loo  # type: ignore[index]
        for name, row in loo["folds"].items():
            print(f"  {key} {name}: recall@5% {row['recall@5%']:.3f} benign flagged {row['benign_flag_rate@5%']:.3f}", flush=True)
        print(f"{key}: {loo['summary']}", flush=True)
    path = HERE / "results_sweep_detection.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("extract", "select"))
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--layers", default="10,14,18,22,26")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.step == "extract":
        extract(args.out, [int(v) for v in args.layers.split(",")], args.max_length)
    else:
        select(args.out, args.epochs, args.top_k)


if __name__ == "__main__":
    main()
