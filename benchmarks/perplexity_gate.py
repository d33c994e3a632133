"""A perplexity trigger beside the steering gate, against GCG suffixes optimised to evade the gate.

GCG suffixes are strings no one writes ("can facts w setuptoolsheet\\"]]2 x x x Step'})"), so the base
model finds them improbable (Jain et al. 2023, "Baseline defenses"). This script measures that
signal as a second trigger for SafeFlow's gate: a prompt is gated on when its *windowed perplexity*
(the largest mean token negative log-likelihood over any ``--window`` consecutive tokens of the user
text, read by the base model without the chat template) exceeds a threshold.

``select`` (validation only): the threshold is the ``1 - --fpr`` quantile of the scores of the
default corpus's benign validation prompts (wrapped, long and code rows included).
``bench`` (the steering bench's test prompts, full preset): how often the trigger fires per set,
and, for the adaptive suffixes, SafeFlow's answers with the rows it flags gated on
(``generate(gate_on=...)``); the answers are written for reading.

    python benchmarks/perplexity_gate.py select --out runs/ppl
    python benchmarks/perplexity_gate.py bench --out runs/ppl
    python benchmarks/perplexity_gate.py bench --out runs/ppl --suffixes nanogcg_adaptive_ppl

``nanogcg_adaptive`` suffixes were optimised against the gate alone; ``nanogcg_adaptive_ppl`` ones
(``gcg_suffixes.py --against ... --ppl-threshold T``) against the gate and this trigger together.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapguard.bench.run import BenchConfig, bench_items, provenance, rate
from sapguard.data.default_corpus import build_default_corpus
from sapguard.io import write_json
from sapguard.models.loading import LoadedModel, load_model
from sapguard.steer.artifact import load_steering
from sapguard.steer.generate import generate

HERE = Path(__file__).resolve().parent
STEERING = HERE.parent / "src" / "sapguard" / "assets" / "steering"


def windowed_nll(lm: LoadedModel, texts: list[str], window: int, max_tokens: int = 512) -> np.ndarray:
    """Per text: the largest mean token NLL over ``window`` consecutive tokens (whole text if shorter)."""
    out = np.zeros(len(texts))
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=lm.device)
            logits = lm.model(x).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            w = min(window, len(nll))
            out[i] = float(nll.unfold(0, w, 1).mean(-1).max())
    return out


def cmd_select(args: argparse.Namespace, lm: LoadedModel) -> None:
    validation = [r for r in build_default_corpus() if r.split == "validation" and not r.history]
    rows = [r for r in validation if r.is_safe]
    scores = windowed_nll(lm, [r.prompt for r in rows], args.window)
    threshold = float(np.quantile(scores, 1 - args.fpr))
    harmful = [r for r in validation if not r.is_safe]
    h_scores = windowed_nll(lm, [r.prompt for r in harmful], args.window)
    by_source: dict[str, list[bool]] = {}
    for r, s in zip(rows, scores):
        by_source.setdefault(r.source, []).append(bool(s > threshold))
    write_json(
        args.out / "select.json",
        {
            "window": args.window,
            "fpr": args.fpr,
            "threshold": threshold,
            "benign_validation": rate([bool(s > threshold) for s in scores]),
            "benign_flagged_by_source": {k: rate(v) for k, v in sorted(by_source.items()) if any(v)},
            "harmful_validation_flagged": rate([bool(s > threshold) for s in h_scores]),
            **provenance(),
        },
    )
    print(json.dumps({"threshold": threshold, "benign_n": len(rows)}))


def cmd_bench(args: argparse.Namespace, lm: LoadedModel) -> None:
    selected = json.loads((args.out / "select.json").read_text())
    threshold, window = float(selected["threshold"]), int(selected["window"])
    corpus = build_default_corpus()
    items = bench_items(corpus, BenchConfig.preset("full", gcg_suffixes="nanogcg"))
    adaptive = [
        it for it in bench_items(corpus, BenchConfig.preset("full", gcg_suffixes=args.suffixes)) if it.set == "gcg"
    ]
    sets: dict[str, list[Any]] = {}
    for it in items:
        sets.setdefault(it.set, []).append(it)
    sets["adaptive"] = adaptive
    flagged: dict[str, list[bool]] = {
        name: [bool(s > threshold) for s in windowed_nll(lm, [it.sent for it in group], window)]
        for name, group in sets.items()
    }
    gate = load_steering(STEERING)
    gens = generate(lm, [it.sent for it in adaptive], gate, "safeflow", max_new_tokens=48, batch_size=16,
                    gate_on=flagged["adaptive"])
    answers = [
        {"request": it.request, "attack": it.attack, "set": "gcg", "condition": "safeflow+perplexity",
         "perplexity_flagged": f, "response": g.response}
        for it, f, g in zip(adaptive, flagged["adaptive"], gens)
    ]
    tag = "" if args.suffixes == "nanogcg_adaptive" else f"_{args.suffixes}"
    with (args.out / f"adaptive_answers{tag}.jsonl").open("w") as f:
        f.writelines(json.dumps(a, sort_keys=True) + "\n" for a in answers)
    write_json(
        args.out / f"bench{tag}.json",
        {"threshold": threshold, "window": window, "adaptive_suffixes": args.suffixes, "flagged": {k: rate(v) for k, v in flagged.items()}, **provenance()},
    )
    print(json.dumps({k: rate(v)["rate"] for k, v in flagged.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("select", "bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--fpr", type=float, default=0.01, help="select: benign validation prompts flagged")
    parser.add_argument(
        "--suffixes", default="nanogcg_adaptive", help="bench: the gate-evading suffix set (or nanogcg_adaptive_ppl)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model("default", device="cpu", dtype="float32")
    if args.command == "select":
        cmd_select(args, lm)
    else:
        cmd_bench(args, lm)


if __name__ == "__main__":
    main()
