"""Compare steering gates on the gate's validation rows (never the bench's test prompts).

    python benchmarks/compare_gates.py --gate NAME=DIR [--gate NAME=DIR ...] [--out FILE]

Rebuilds the validation rows of :func:`sapguard.steer.target.gate_records` (default
``SteeringTrainConfig``: plain validation requests, requests wrapped in the training families, the
corpus's own wrapped rows except the collections the bench holds out), reads each gate's layer once
and reports, per gate, recall on harmful and fire rate on benign rows, plain and wrapped apart,
with 95 % Wilson intervals. Writes JSON with the commit and command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sapguard.bench.run import provenance, rate
from sapguard.data.default_corpus import build_default_corpus
from sapguard.features.extract import extract_features
from sapguard.io import write_json
from sapguard.models.loading import load_model
from sapguard.steer.artifact import load_steering
from sapguard.steer.hook import hook_settings
from sapguard.steer.target import SteeringTrainConfig, gate_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", action="append", required=True, help="NAME=DIR of a steering artifact")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_gates.json"))
    args = parser.parse_args()
    gates = {name: load_steering(path) for name, path in (g.split("=", 1) for g in args.gate)}
    start = time.perf_counter()
    records = [
        r for r in gate_records(build_default_corpus(), SteeringTrainConfig()) if r.split == "validation"
    ]
    lm = load_model("default")
    wrapped = np.array([r.wrapper is not None or "+" in r.source for r in records])
    unsafe = np.array([not r.is_safe for r in records])
    states: dict[int, torch.Tensor] = {}
    report: dict[str, dict[str, object]] = {}
    for name, gate in gates.items():
        layer = int(gate.meta["layer"])
        if layer not in states:
            x, idx, _ = extract_features(lm, records, layer, policy="last_prompt", show_progress=True)
            assert idx.tolist() == list(range(len(records)))
            states[layer] = x
        with torch.no_grad():
            threshold = float(hook_settings(gate)["threshold"])
            fired = gate.score(states[layer]).numpy() > threshold
        cells = {
            "recall_plain": unsafe & ~wrapped,
            "recall_wrapped": unsafe & wrapped,
            "fire_rate_benign_plain": ~unsafe & ~wrapped,
            "fire_rate_benign_wrapped": ~unsafe & wrapped,
        }
        report[name] = {
            "layer": layer,
            "train_config": {
                k: gate.meta.get("train_config", {}).get(k) for k in ("encoder", "num_facets", "loss")
            },
            **{key: rate(fired[m].tolist()) for key, m in cells.items()},
        }
    out = {
        "what": "steering gates on the gate's validation rows (plain, training-family wrapped, corpus wrapped minus bench-held-out collections)",
        "rows": len(records),
        "gates": report,
        "seconds": round(time.perf_counter() - start, 1),
        "provenance": provenance(["python", *sys.argv]),
    }
    write_json(args.out, out)
    print(json.dumps(out["gates"], indent=1))


if __name__ == "__main__":
    main()
