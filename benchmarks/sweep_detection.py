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
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import read_jsonl, write_jsonl
from sapguard.evaluate import Scorer, Trainer, leave_one_out
from sapguard.features.extract import Encoded, encode_records, length_sorted_batches
from sapguard.features.hooks import left_pad
from sapguard.models.chat import resolve_template
from sapguard.models.layers import block_for_layer, unwrap_hidden
from sapguard.models.loading import load_model
from sapguard.polytope.model import EncoderSpec
from sapguard.polytope.train import TrainConfig, auroc, raw_scores, train_polytope

HERE = Path(__file__).resolve().parent


class _Stop(Exception):
    pass


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _reusable(reuse: Path | None, records: list, layers: list[int], max_length: int) -> dict[int, tuple[int, dict]]:
    """Rows of an earlier extraction (same layers and window) whose text is unchanged: ``{new: (old, data)}``."""
    if reuse is None:
        return {}
    meta = json.loads((reuse / "meta.json").read_text())
    if meta["layers"] != layers or meta["max_length"] != max_length:
        raise SystemExit(f"{reuse}: extracted with layers {meta['layers']}, max_length {meta['max_length']}; cannot reuse")
    old = {r.key: i for i, r in enumerate(read_jsonl(reuse / "records.jsonl"))}
    data = load_file(str(reuse / "features.safetensors"))
    return {i: (old[r.key], data) for i, r in enumerate(records) if r.key in old}


def read_layers(
    lm: Any, encoded: list[Encoded], layers: list[int], desc: str
) -> Iterator[tuple[list[Encoded], dict[int, torch.Tensor], int]]:
    """Length-sorted, left-padded batches through the model, stopped after the highest of ``layers``:
    yields each batch, ``{layer: [B, T, d] states}`` and its real-token count."""
    captured: dict[int, torch.Tensor] = {}
    top = max(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            captured[layer] = unwrap_hidden(output)
            if layer == top:
                raise _Stop

        return hook

    handles = [block_for_layer(lm.model, layer).register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        for batch in tqdm(length_sorted_batches(encoded, 32, 8192), desc=desc, unit="batch"):
            inputs = left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
            with contextlib.suppress(_Stop):
                lm.model(**inputs, use_cache=False)
            yield batch, captured, int(inputs["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def extract(out: Path, layers: list[int], max_length: int, reuse: Path | None = None) -> None:
    records = build_default_corpus()
    reused = _reusable(reuse, records, layers, max_length)
    lm = load_model("default")
    template = resolve_template(lm.tokenizer, "auto")
    encoded = encode_records(lm, records, "mean_prompt", template, max_length)
    assert len(encoded) == len(records)
    encoded = [e for e in encoded if e.record_index not in reused]
    print(f"{len(reused)} rows reused from {reuse}, {len(encoded)} to read", flush=True)
    last = torch.zeros(len(records), len(layers), lm.hidden_size, dtype=torch.float16)
    mean = torch.zeros_like(last)
    for i, (j, data) in reused.items():
        last[i], mean[i] = data["last"][j], data["mean"][j]
    start = time.perf_counter()
    tokens = 0
    for batch, captured, n_tokens in read_layers(lm, encoded, layers, "extract"):
        tokens += n_tokens
        width = captured[layers[0]].shape[1]
        for b, e in enumerate(batch):
            pos = [width - len(e.ids) + p for p in e.positions]
            for j, layer in enumerate(layers):
                h = captured[layer][b]
                last[e.record_index, j] = h[width - 1].half()
                mean[e.record_index, j] = h[pos].float().mean(0).half()
    out.mkdir(parents=True, exist_ok=True)
    save_file({"last": last, "mean": mean}, str(out / "features.safetensors"))
    write_jsonl(out / "records.jsonl", records)
    elapsed = time.perf_counter() - start
    info = {"layers": layers, "max_length": max_length, "tokens": tokens, "seconds": elapsed, "reused_rows": len(reused)}
    (out / "meta.json").write_text(json.dumps(info))
    print(f"extracted {len(records)} texts, {tokens} tokens in {elapsed:.0f}s ({tokens / elapsed:.0f} tok/s)")


def parse_candidate(text: str) -> tuple[str, dict[str, object]]:
    """``"last@18|loss=logistic,num_facets=4,encoder=identity"`` -> ("last@18", TrainConfig overrides)."""
    rep, _, settings = text.partition("|")
    overrides: dict[str, object] = {}
    defaults = TrainConfig()
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key == "encoder":
            kind, _, width = value.partition(":")
            overrides[key] = EncoderSpec(kind=kind, width=int(width or 1024))
        else:
            overrides[key] = type(getattr(defaults, key))(value)
    return rep, overrides


def features(data: dict[str, torch.Tensor], layers: dict[str, list[int]], rep: str) -> torch.Tensor:
    """``"last@14+last@18"`` -> the named (pooling, layer) features, concatenated (``layers``: the
    layers stored for each pooling)."""
    parts = [data[p][:, layers[p].index(int(layer))].float() for p, layer in (part.split("@") for part in rep.split("+"))]
    return torch.cat(parts, dim=1)


def probe_trainer(c: float) -> Trainer:
    """Logistic regression on features standardised with the training rows' statistics (baseline)."""

    def fit(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray) -> Scorer:
        mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
        model = LogisticRegression(C=c, max_iter=3000).fit(((x_tr - mu) / sd).numpy(), y_tr)
        return lambda z: model.decision_function(((z - mu) / sd).numpy())

    return fit


PROBE_KEYS = ("n", "n_unsafe", "recall@5%", "benign_flag_rate@5%")


def probe_leave_one_out(x: torch.Tensor, y: np.ndarray, records: list, c: float) -> dict[str, object]:
    """:func:`leave_one_out` (the same folds, fold loop and thresholds) for a logistic-regression probe."""
    loo = leave_one_out(x, y, records, fit=probe_trainer(c), report="validation", fprs=(0.05,))
    return {"folds": {name: {k: row[k] for k in PROBE_KEYS} for name, row in loo["folds"].items()}}


def held_out_scores(loo: dict) -> dict[str, float]:  # type: ignore[type-arg]
    """Mean held-out recall at 5 % FPR, and mean (recall - benign flag rate) over folds (wrapped benign rows
    of a held-out family flagged as often as harmful ones score 0: the wrapper, not the request, was read)."""
    folds = loo["folds"].values()
    recall = [f["recall@5%"] for f in folds]
    gap = [f["recall@5%"] - (0.0 if np.isnan(f["benign_flag_rate@5%"]) else f["benign_flag_rate@5%"]) for f in folds]
    return {"mean_recall@5%": float(np.mean(recall)), "mean_recall_minus_benign_flag@5%": float(np.mean(gap))}


def select(out: Path, candidates: list[str], probe_c: float | None, path: Path, join: list[str] = ()) -> None:
    """Validation leave-one-out for each candidate (representation x training settings); test never read.

    ``join``: ``DIR:NAME`` entries, another extraction's last-token states of the same records (for
    example ``ask_view.py``'s) offered to the candidates as pooling ``NAME``.
    """
    data = load_file(str(out / "features.safetensors"))
    meta = json.loads((out / "meta.json").read_text())
    records = read_jsonl(out / "records.jsonl")
    layers = dict.fromkeys(data, meta["layers"])
    for entry in join:
        other, _, name = entry.rpartition(":")
        if [r.key for r in read_jsonl(Path(other) / "records.jsonl")] != [r.key for r in records]:
            raise SystemExit(f"--join {entry}: its records differ from {out}'s")
        data[name] = load_file(str(Path(other) / "features.safetensors"))["last"]
        layers[name] = json.loads((Path(other) / "meta.json").read_text())["layers"]
    y = np.array([0 if r.is_safe else 1 for r in records])
    split = np.array([r.split for r in records])
    tr, va = split == "train", split == "validation"
    results: dict[str, Any] = {
        "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "layers": layers,
        "extraction": meta,
        "joined": list(join),
        "candidates": {},
    }
    for text in candidates:
        rep, overrides = parse_candidate(text)
        x = features(data, layers, rep)
        cfg = replace(TrainConfig(), **overrides)
        start = time.perf_counter()
        poly = train_polytope(x[tr], y[tr], x[va], y[va], cfg).polytope
        val_auroc = auroc(y[va], raw_scores(poly, x[va]))
        loo = leave_one_out(x, y, records, cfg, report="validation")
        row = {"representation": rep, "train_config": cfg.to_dict(), "val_auroc": val_auroc, **held_out_scores(loo),
               "folds": loo["folds"], "seconds": time.perf_counter() - start}
        results["candidates"][text] = row
        print(f"{text}: val AUROC {val_auroc:.3f}, held-out recall@5% {row['mean_recall@5%']:.3f}, "
              f"recall - benign flag {row['mean_recall_minus_benign_flag@5%']:.3f}", flush=True)
        if probe_c is not None and f"probe:{rep}" not in results["candidates"]:
            loo = probe_leave_one_out(x, y, records, probe_c)
            results["candidates"][f"probe:{rep}"] = {"representation": rep, "probe": f"logistic regression C={probe_c}",
                                                     **held_out_scores(loo), "folds": loo["folds"]}
            print(f"probe:{rep}: {held_out_scores(loo)}", flush=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("extract", "select"))
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--layers", default="10,14,18,22,26")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--candidates", nargs="+", default=["last@18", "last@18|loss=logistic,encoder=identity,num_facets=4,lr=0.01,epochs=30,patience=30"],
                        help="representation|TrainConfig overrides, e.g. 'last@22|loss=logistic,encoder=identity,num_facets=4'")
    parser.add_argument("--probe-c", type=float, default=0.1, help="also score a logistic-regression probe (baseline); C")
    parser.add_argument("--results", type=Path, default=HERE / "results_sweep_detection.json",
                        help="where select writes its results (rewritten after every candidate)")
    parser.add_argument("--join", nargs="*", default=[], help="select: DIR:NAME, another extraction's last-token states as pooling NAME")
    parser.add_argument("--reuse", type=Path, help="an earlier extract directory: rows whose text is unchanged are copied")
    args = parser.parse_args()
    if args.step == "extract":
        extract(args.out, [int(v) for v in args.layers.split(",")], args.max_length, args.reuse)
    else:
        select(args.out, args.candidates, args.probe_c, args.results, args.join)


if __name__ == "__main__":
    main()
