"""Exp 13: steered answers loop ("I'm sorry for any other. I'm sorry for any other. ..."). Does a
repetition penalty on the steered rows' decoding (HF ``repetition_penalty``) turn those loops into
coherent refusals without letting compliance back in? Validation-split harmful requests, plain and
wrapped by the *training* families (handwritten, rewrite); the shipped artifact; every row of the
safeflow condition decoded with the penalty (the gate fires on most of them; unfired rows are
reported apart). Usage: python exp13.py OUT PENALTY
"""
import functools
import json
import sys
from pathlib import Path

from sapguard.bench.run import BenchConfig, run_bench
from sapguard.data.default_corpus import build_default_corpus
from sapguard.models.loading import load_model
from sapguard.steer.artifact import load_steering

out, penalty = Path(sys.argv[1]), float(sys.argv[2])
lm = load_model("default")
if penalty != 1.0:
    lm.model.generate = functools.partial(lm.model.generate, repetition_penalty=penalty)
gate = load_steering("src/sapguard/assets/steering")
cfg = BenchConfig.preset("full", split="validation", conditions=("safeflow",), families=("handwritten", "rewrite"),
                         n_gcg=0, n_benign=0, n_edgy=0, n_mmlu=1)
report = run_bench(lm, gate, build_default_corpus(), cfg, show_progress=True)
out.mkdir(parents=True, exist_ok=True)
(out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1, default=str))
with open(out / "samples.jsonl", "w") as fh:
    for name, rows in report["samples"].items():
        for row in rows:
            fh.write(json.dumps({"condition": name, **row}) + "\n")
