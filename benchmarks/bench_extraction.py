"""Extraction throughput against a batch-1 loop and a raw batched forward; polytope training speed.

Run: ``python benchmarks/bench_extraction.py [--n 256] [--out benchmarks/results_extraction.json]``.
All conditions run in one process on the same prompts, interleaved over ``--repeats`` rounds, so
ratios are side by side on the same (noisy) machine. Wall-clock and process CPU time are both
reported; CPU time is less disturbed by other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch

from sapguard.data.default_corpus import build_default_corpus
from sapguard.features.extract import encode_records, extract_features, length_sorted_batches
from sapguard.features.hooks import left_pad
from sapguard.models.chat import resolve_template
from sapguard.models.loading import load_model
from sapguard.polytope.model import EncoderSpec
from sapguard.polytope.train import TrainConfig, train_polytope

LAYER = 20


@torch.inference_mode()
def batch1_loop(lm, encoded) -> None:
    """The research code's way: one text at a time, full forward, all hidden states."""
    for item in encoded:
        out = lm.model(input_ids=torch.tensor([item.ids]), output_hidden_states=True, use_cache=False)
        out.hidden_states[LAYER][0, -1].clone()


@torch.inference_mode()
def raw_batched(lm, batches) -> None:
    """Same length-sorted batches, plain full forward, no hooks, nothing read."""
    for batch in batches:
        lm.model(**left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device), use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results_extraction.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model("default")
    records = build_default_corpus()
    rng = np.random.default_rng(0)
    sample = [records[i] for i in rng.choice(len(records), args.n, replace=False)]
    template = resolve_template(lm.tokenizer, "auto")
    encoded = encode_records(lm, sample, "last_prompt", template, 1024)
    tokens = sum(len(e.ids) for e in encoded)
    batches = length_sorted_batches(encoded, 32, 16384)
    conditions = {
        "sapguard_extract": lambda: extract_features(lm, sample, LAYER, batch_size=32),
        "raw_batched_forward": lambda: raw_batched(lm, batches),
        "batch1_loop": lambda: batch1_loop(lm, encoded),
    }
    wall: dict[str, list[float]] = {k: [] for k in conditions}
    cpu: dict[str, list[float]] = {k: [] for k in conditions}
    for _ in range(args.repeats):
        for name, fn in conditions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tps = {k: tokens / float(np.median(v)) for k, v in wall.items()}
    tps_cpu = {k: tokens / float(np.median(v)) for k, v in cpu.items()}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (default), layer 20, last_prompt, chat template",
        "texts": len(encoded),
        "tokens": tokens,
        "tokens_per_s": tps,
        "tokens_per_cpu_s": tps_cpu,
        "ratio_vs_batch1": tps["sapguard_extract"] / tps["batch1_loop"],
        "ratio_vs_raw_batched": tps["sapguard_extract"] / tps["raw_batched_forward"],
        "cpu_ratio_vs_batch1": tps_cpu["sapguard_extract"] / tps_cpu["batch1_loop"],
        "cpu_ratio_vs_raw_batched": tps_cpu["sapguard_extract"] / tps_cpu["raw_batched_forward"],
    }
    x = torch.randn(4096, lm.hidden_size)
    y = (torch.rand(4096) < 0.5).long().numpy()
    training = {}
    for width in (4096, 16384):
        cfg = TrainConfig(encoder=EncoderSpec("mlp", width=width), epochs=1, patience=1)
        start = time.perf_counter()
        train_polytope(x, y, x[:512], y[:512], cfg)
        training[f"width_{width}"] = {"rows_per_s": 4096 / (time.perf_counter() - start), "facets": cfg.num_facets}
    result["training"] = training
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
