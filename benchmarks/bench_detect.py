"""`scan()` throughput on a mix of short and ~1,000-token inputs against a raw truncated forward.

The baseline is the cheapest thing that could read the same states: the same length-sorted,
left-padded batches through the embeddings and the first L decoder blocks only (the blocks above
the read layer removed, no LM head), with nothing read out. ``scan`` adds tokenising, the chat
template, windowing checks, the polytope and the verdicts. Both run in one process on the same
texts, interleaved over ``--repeats`` rounds; wall and process-CPU tokens/s are reported.

Run: ``python benchmarks/bench_detect.py [--short 96] [--long 16]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import Record
from sapguard.detect import scan
from sapguard.features.extract import MAX_BATCH_TOKENS, encode_records, length_sorted_batches
from sapguard.features.hooks import left_pad
from sapguard.models.chat import resolve_template
from sapguard.models.layers import find_decoder_blocks
from sapguard.models.loading import load_model
from sapguard.polytope.artifact import default_polytope

HERE = Path(__file__).resolve().parent


@torch.inference_mode()
def truncated_forward(lm, batches, layer: int) -> None:
    """Embeddings + blocks 1..layer, nothing else, on the same batches."""
    blocks = find_decoder_blocks(lm.model)
    body = lm.model.model
    original = body.layers
    body.layers = nn.ModuleList(list(blocks)[:layer])
    try:
        for batch in batches:
            body(**left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device), use_cache=False)
    finally:
        body.layers = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", type=int, default=96)
    parser.add_argument("--long", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results_detect.json")
    args = parser.parse_args()
    lm = load_model("default")
    poly = default_polytope()
    corpus = build_default_corpus()
    rng = np.random.default_rng(0)
    plain = [r.prompt for r in corpus if r.wrapper is None]
    docs = [r.prompt for r in corpus if r.wrapper and r.wrapper.startswith("long_context")]
    short = [plain[i] for i in rng.choice(len(plain), args.short, replace=False)]
    long = []
    for i in range(args.long):
        text = ""
        while len(lm.tokenizer(text)["input_ids"]) < 950:
            text += docs[int(rng.integers(len(docs)))] + "\n\n"
        long.append(text + plain[i])
    texts = short + long
    layer = int(poly.meta["layer"])
    policy = "last_prompt" if poly.meta["policy"] == "last_prompt" else "mean_prompt"
    template = resolve_template(lm.tokenizer, "auto")
    encoded = encode_records(lm, [Record(t) for t in texts], policy, template, 4096)
    tokens = sum(len(e.ids) for e in encoded)
    batches = length_sorted_batches(encoded, 32, MAX_BATCH_TOKENS)
    conditions = {
        "scan": lambda: scan(poly, texts, lm=lm, window=1536),
        "raw_truncated_forward": lambda: truncated_forward(lm, batches, layer),
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": f"python benchmarks/bench_detect.py --short {args.short} --long {args.long} --repeats {args.repeats}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "detector": f"shipped default, layer {layer}, {poly.meta['policy']}",
        "texts": {"short": len(short), "long_about_1000_tokens": len(long)},
        "tokens": tokens,
        "tokens_per_s": tps,
        "tokens_per_cpu_s": tps_cpu,
        "ratio_scan_vs_raw": tps["scan"] / tps["raw_truncated_forward"],
        "cpu_ratio_scan_vs_raw": tps_cpu["scan"] / tps_cpu["raw_truncated_forward"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
