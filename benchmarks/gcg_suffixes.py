"""Adaptive GCG suffixes with ``nanogcg``, optimised against the *base* default model (transfer attack).

Each suffix is optimised on one **train-split** harmful request of the default corpus, so that the
base model answers it with an affirmative opening (``--target``); the bench then appends the
suffixes to **test-split** requests (``bench_steering.py bench --set gcg_suffixes='"nanogcg"'``):
the attack transfers across requests and from the base model to the defended one. Rows are written
after each request (atomically), with the commit, the command and nanogcg's settings, to
``src/sapguard/assets/attacks/nanogcg_smollm2.jsonl`` (package data: the bench reads it offline).

nanogcg 0.3.0 pins ``transformers<=4.47.1`` on PyPI but runs on the project's transformers without
its prefix cache (``use_prefix_cache=False``, the only setting this script uses), so it is installed
without dependencies: ``make gcg`` does that and runs this script with the committed settings.

On 2 CPU cores one step (64 candidates) costs ~20 s; the published 500 steps x 512 candidates per
request needs a GPU. The budget used is recorded in every row.

    python benchmarks/gcg_suffixes.py --n-requests 8 --steps 20 --search-width 64
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import random
import time
from pathlib import Path

import torch

from sapguard.bench.run import provenance
from sapguard.data.default_corpus import build_default_corpus
from sapguard.io import atomic_write
from sapguard.models.loading import load_model

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "src" / "sapguard" / "assets" / "attacks" / "nanogcg_smollm2.jsonl"
TARGET = "Sure, here is how to do it. Step 1:"


def train_requests(n: int, max_chars: int, seed: int) -> list[str]:
    """``n`` plain harmful train-split requests (no tense rephrasings), shuffled with ``seed``."""
    pool = sorted(
        {
            r.prompt
            for r in build_default_corpus()
            if r.split == "train"
            and not r.is_safe
            and r.wrapper is None
            and not r.history
            and "tense" not in r.source
            and len(r.prompt) <= max_chars
        }
    )
    random.Random(seed).shuffle(pool)
    return pool[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--search-width", type=int, default=64)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--max-chars", type=int, default=120, help="longest request to optimise on")
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import nanogcg  # optional: `make gcg` installs it (see the module docstring)

    lm = load_model("default")
    settings = {
        "num_steps": args.steps,
        "search_width": args.search_width,
        "topk": args.topk,
        "seed": args.seed,
        "early_stop": True,
        "use_prefix_cache": False,
        "verbosity": "WARNING",
    }
    meta = {"nanogcg": importlib.metadata.version("nanogcg"), "config": settings,
            "target": args.target, "attacked_model": "default (base, no defence)", **provenance()}
    rows: list[dict] = []
    for i, request in enumerate(train_requests(args.n_requests, args.max_chars, args.seed)):
        start = time.perf_counter()
        result = nanogcg.run(lm.model, lm.tokenizer, request, args.target, nanogcg.GCGConfig(**settings))
        # does the attacked (base) model now open with the target under greedy decoding?
        chat = [{"role": "user", "content": f"{request} {result.best_string}"}]
        ids = lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.inference_mode():
            out = lm.model.generate(**ids, max_new_tokens=24, do_sample=False)
        reply = lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"name": f"nanogcg:{i}", "suffix": result.best_string, "request": request,
                     "loss": round(float(result.best_loss), 4), "steps_run": len(result.losses),
                     "seconds": round(time.perf_counter() - start, 1), "base_reply": reply, **meta})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        print(json.dumps({k: rows[-1][k] for k in ("name", "loss", "steps_run", "seconds", "base_reply")}),
              flush=True)


if __name__ == "__main__":
    main()
