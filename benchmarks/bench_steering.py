"""Steering benchmark on the default model: train the steering polytope, tune on validation,
report on test, and measure the hook's overhead.

    python benchmarks/bench_steering.py train  --work DIR [--layer 20]
    python benchmarks/bench_steering.py tune   --work DIR          # validation prompts only
    python benchmarks/bench_steering.py configure --work DIR --set 'hook={"first_n": 1}' 'defaults={"redirect": {"alpha": 3}}'
    python benchmarks/bench_steering.py bench  --work DIR [--set KEY=VALUE ...]   # test prompts
    python benchmarks/bench_steering.py perf   --work DIR

Everything lands in DIR (records.jsonl, polytope-L<layer>/, tune.json, bench/report.{json,md}, perf.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from sapguard.bench.run import BenchConfig, markdown, run_bench
from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import read_jsonl, write_jsonl
from sapguard.io import atomic_write, write_json
from sapguard.models.loading import load_model
from sapguard.polytope.artifact import load_polytope
from sapguard.steer.dataset import build_steering_records, train_steering_polytope
from sapguard.steer.generate import generate


def _poly_dir(work: Path, layer: int, tag: str = "") -> Path:
    return work / f"polytope-L{layer}{tag}"


def cmd_train(args: argparse.Namespace) -> None:
    lm = load_model("default")
    records_path = args.work / "records.jsonl"
    if records_path.exists():
        records = read_jsonl(records_path)
    else:
        records = build_steering_records(
            lm,
            build_default_corpus(),
            sizes={"train": (80, 80), "validation": (30, 30)},
            max_new_tokens=32,
            show_progress=True,
        )
        write_jsonl(records_path, records)
    start = time.perf_counter()
    prompts = None
    if args.prompt_rows:
        prompts = [r for r in build_default_corpus() if r.split in ("train", "validation")]
    poly = train_steering_polytope(lm, records, args.layer, prompt_records=prompts, show_progress=True)
    poly.save_pretrained(_poly_dir(args.work, args.layer, args.tag))
    val = poly.meta["calibration"]
    print(
        json.dumps(
            {
                "layer": args.layer,
                "seconds": round(time.perf_counter() - start, 1),
                "best_epoch": poly.meta["best_epoch"],
                "val_auroc": max(h["val_auroc"] for h in poly.meta["history"]),
                "offset": val["offset"],
            }
        )
    )


def _parse_sets(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = json.loads(value)
    return out


def cmd_tune(args: argparse.Namespace) -> None:
    """Small grid on validation prompts: gate threshold, SafeFlow margin, redirect alpha."""
    lm = load_model("default")
    poly = load_polytope(_poly_dir(args.work, args.layer, args.tag))
    corpus = build_default_corpus()
    grid = [
        {"threshold": t, "safeflow": {"margin": m}, "redirect": {"alpha": a}}
        for t in args.thresholds
        for m, a in zip(args.margins, args.alphas)
    ]
    results = []
    for point in grid:
        cfg = BenchConfig.preset(
            "quick",
            split="validation",
            conditions=("base", "safeflow", "redirect"),
            n_jailbreak=0,
            n_gcg=0,
            n_direct=16,
            n_benign=12,
            n_edgy=12,
            n_mmlu=12,
            **point,
        )
        report = run_bench(lm, poly, corpus, cfg)
        row = {
            "point": point,
            **{
                c: {
                    k: report["conditions"][c].get(k)
                    for k in ("direct", "benign", "edgy_benign", "kl_per_token", "mmlu_accuracy")
                }
                for c in report["conditions"]
            },
        }
        results.append(row)
        print(json.dumps(row))
        write_json(args.work / f"tune-L{args.layer}{args.tag}.json", results)


def cmd_bench(args: argparse.Namespace) -> None:
    lm = load_model("default")
    poly = load_polytope(_poly_dir(args.work, args.layer, args.tag))
    cfg = BenchConfig.preset(args.preset, **_parse_sets(args.set))
    start = time.perf_counter()
    report = run_bench(lm, poly, build_default_corpus(), cfg, show_progress=True)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = args.work / f"bench-L{args.layer}{args.tag}"
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    print("wall seconds", report["wall_seconds"])


def cmd_configure(args: argparse.Namespace) -> None:
    """Store tuned settings in the artifact: ``--set hook='{...}' defaults='{...}'`` merge into meta.steering."""
    path = _poly_dir(args.work, args.layer, args.tag)
    poly = load_polytope(path)
    poly.meta.setdefault("steering", {}).update(_parse_sets(args.set))
    poly.save_pretrained(path)
    print(json.dumps({k: v for k, v in poly.meta["steering"].items() if k != "direction"}))


def cmd_perf(args: argparse.Namespace) -> None:
    """Tokens/s: plain vs steering installed but never triggered; cost per edited token."""
    lm = load_model("default")
    poly = load_polytope(_poly_dir(args.work, args.layer, args.tag))
    corpus = build_default_corpus()
    benign = [
        r.prompt
        for r in corpus
        if r.is_safe and r.split == "test" and r.source == "sapguard/curated-everyday"
    ][:8]
    harmful = [r.prompt for r in corpus if not r.is_safe and r.split == "test"][:8]
    opts = {"max_new_tokens": 32, "batch_size": 8}

    # CPU time of this process, not wall time: the benchmark machine is shared, and wall-clock
    # ratios there measure the neighbours. A warm-up run precedes the timed ones.
    clock = time.process_time

    def tps(fn) -> tuple[float, list]:
        start = clock()
        gens = fn()
        return sum(len(g.token_ids) for g in gens) / (clock() - start), gens

    generate(lm, benign[:2], None, None, max_new_tokens=4)

    plain, idle = [], []
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        plain.append(tps(lambda: generate(lm, benign, None, None, **opts))[0])
        idle.append(tps(lambda: generate(lm, benign, poly, "safeflow", threshold=1e9, **opts))[0])
    timings = {}
    for name, kwargs in (
        ("detect", {"mode": "detect"}),
        ("safeflow", {"mode": "safeflow"}),
        ("redirect", {"mode": "redirect"}),
    ):
        start = clock()
        gens = generate(lm, harmful, poly, **kwargs, **opts)
        timings[name] = {
            "cpu_seconds": clock() - start,
            "edited": sum(g.summary.edited_tokens for g in gens),
            "steps": sum(g.summary.total_steps for g in gens),
            "tokens": sum(len(g.token_ids) for g in gens),
        }
    result = {
        "plain_tokens_per_s": statistics.median(plain),
        "idle_hook_tokens_per_s": statistics.median(idle),
        "idle_ratio": statistics.median(idle) / statistics.median(plain),
        "rounds": args.rounds,
        "harmful": timings,
        "safeflow_slowdown_vs_detect": timings["safeflow"]["cpu_seconds"] / timings["detect"]["cpu_seconds"],
        "redirect_slowdown_vs_detect": timings["redirect"]["cpu_seconds"] / timings["detect"]["cpu_seconds"],
        "safeflow_ms_per_edited_token": 1000
        * (timings["safeflow"]["cpu_seconds"] - timings["detect"]["cpu_seconds"])
        / max(timings["safeflow"]["edited"], 1),
        "threads": torch.get_num_threads(),
        "clock": "process CPU time",
    }
    write_json(args.work / f"perf-L{args.layer}{args.tag}.json", result)
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("train", "tune", "configure", "bench", "perf"))
    parser.add_argument("--work", type=Path, default=Path("bench-steering"))
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", nargs="*", default=[], help="BenchConfig overrides, KEY=JSON")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.0])
    parser.add_argument("--margins", type=float, nargs="*", default=[1.0])
    parser.add_argument("--alphas", type=float, nargs="*", default=[1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prompt-rows",
        action="store_true",
        help="Add last-prompt-token rows of all train/validation prompts.",
    )
    parser.add_argument("--tag", default="", help="Suffix of the polytope directory.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    {"train": cmd_train, "tune": cmd_tune, "configure": cmd_configure, "bench": cmd_bench, "perf": cmd_perf}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
