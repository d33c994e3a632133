"""Steering benchmark on the default model: train the artifact, bench it condition by condition.

    python benchmarks/bench_steering.py train --work DIR [--layer 16]     # = sap steer-train --out DIR/artifact
    python benchmarks/bench_steering.py bench --work DIR [--preset full] [--set KEY=JSON ...]
           [--conditions base,safeflow,redirect] [--split test]
    python benchmarks/bench_steering.py perf  --work DIR                  # idle-hook overhead, cost per edit
    python benchmarks/bench_steering.py read  --samples S.jsonl --out R.json  # judges vs hand labels, ASR by reading

``bench`` runs one condition at a time and writes ``DIR/bench/<condition>.json`` after each (so a
long run can be inspected and resumed: finished conditions are skipped), then merges them into
``DIR/bench/report.{json,md}`` and ``DIR/bench/samples.jsonl`` (every response with its judge
labels). Each partial report records its commit and command (``provenance``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sapguard.bench.run import BenchConfig, markdown, provenance, run_bench
from sapguard.data.default_corpus import build_default_corpus
from sapguard.io import atomic_write, read_json, write_json
from sapguard.models.loading import load_model
from sapguard.steer.artifact import load_steering, save_steering
from sapguard.steer.generate import generate
from sapguard.steer.target import SteeringTrainConfig, train_steering


def cmd_train(args: argparse.Namespace) -> None:
    lm = load_model("default")
    start = time.perf_counter()
    gate = train_steering(lm, build_default_corpus(), args.layer, SteeringTrainConfig(), show_progress=True)
    save_steering(gate, args.work / "artifact")
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "out": str(args.work / "artifact")}))


def _config(args: argparse.Namespace, conditions: tuple[str, ...]) -> BenchConfig:
    overrides: dict[str, Any] = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if "families" in overrides:
        overrides["families"] = tuple(overrides["families"])
    return BenchConfig.preset(args.preset, split=args.split, conditions=conditions, **overrides)


def cmd_bench(args: argparse.Namespace) -> None:
    lm = load_model("default")
    gate = load_steering(args.artifact or args.work / "artifact")
    corpus = build_default_corpus()
    out = args.work / "bench"
    out.mkdir(parents=True, exist_ok=True)
    groups = [
        ("base", "refuse") if c == "base" else (c,) for c in args.conditions.split(",") if c != "refuse"
    ]
    parts = []
    for group in groups:
        path = out / f"{group[0]}.json"
        if path.exists():
            parts.append(read_json(path, "partial report"))
            continue
        start = time.perf_counter()
        report = run_bench(lm, gate, corpus, _config(args, group), show_progress=True)
        report["wall_seconds"] = round(time.perf_counter() - start, 1)
        write_json(path, report)
        parts.append(report)
        logging.info("%s done in %.0fs", ",".join(group), report["wall_seconds"])
    merged = dict(parts[0])
    merged["conditions"], merged["samples"] = {}, {}
    merged["partial_provenance"] = {}
    for part in parts:
        merged["conditions"].update(part["conditions"])
        merged["samples"].update(part["samples"])
        for name in part["conditions"]:
            merged["partial_provenance"][name] = part["provenance"]
    merged["provenance"] = provenance(sys.argv)
    merged["artifact"] = str(args.artifact or args.work / "artifact")
    with atomic_write(out / "samples.jsonl") as fh:
        for name, rows in merged["samples"].items():
            for row in rows:
                fh.write(json.dumps({"condition": name, **row}, ensure_ascii=False) + "\n")
    write_json(out / "report.json", {k: v for k, v in merged.items() if k != "samples"})
    with atomic_write(out / "report.md") as fh:
        fh.write(markdown(merged))
    print(markdown(merged))


def cmd_perf(args: argparse.Namespace) -> None:
    """Tokens/s: plain vs steering installed but never triggered; cost per edited token."""
    lm = load_model("default")
    gate = load_steering(args.artifact or args.work / "artifact")
    corpus = build_default_corpus()
    benign = [
        r.prompt
        for r in corpus
        if r.is_safe and r.split == "test" and r.source == "sapguard/curated-everyday"
    ][:8]
    harmful = [r.prompt for r in corpus if not r.is_safe and r.split == "test" and r.wrapper is None][:8]
    opts = {"max_new_tokens": 32, "batch_size": 8}
    # CPU time of this process, not wall time: the machine is shared, and wall-clock ratios there
    # measure the neighbours. A warm-up run precedes the timed ones.
    clock = time.process_time

    def tps(fn: Any) -> float:
        start = clock()
        gens = fn()
        return sum(len(g.token_ids) for g in gens) / (clock() - start)

    generate(lm, benign[:2], None, None, max_new_tokens=4)
    plain, idle = [], []
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        plain.append(tps(lambda: generate(lm, benign, None, None, **opts)))
        idle.append(tps(lambda: generate(lm, benign, gate, "safeflow", threshold=1e9, **opts)))
    timings = {}
    for name in ("detect", "safeflow", "redirect"):
        start = clock()
        gens = generate(lm, harmful, gate, name, **opts)
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
        "safeflow_ms_per_edited_token": 1000
        * (timings["safeflow"]["cpu_seconds"] - timings["detect"]["cpu_seconds"])
        / max(timings["safeflow"]["edited"], 1),
        "threads": torch.get_num_threads(),
        "clock": "process CPU time",
        "provenance": provenance(sys.argv),
    }
    write_json(args.work / "perf.json", result)
    print(json.dumps(result, indent=2))


def cmd_read(args: argparse.Namespace) -> None:
    """Judge agreement with the hand labels (all, base, steered) and attack success by reading."""
    from sapguard.bench.agreement import judge_agreement, read_labels, reading_rates

    if args.samples is None or args.out is None:
        raise SystemExit("read needs --samples (a bench's samples.jsonl) and --out")
    samples = [
        json.loads(line) for line in args.samples.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    rows = read_labels()
    name = args.samples.name  # a bench's own samples.jsonl sits beside report.json; committed copies are X_samples.jsonl
    report_file = (
        args.samples.with_name("report.json" if name == "samples.jsonl" else name.replace("_samples.jsonl", ".json"))
        if name == "samples.jsonl" or name.endswith("_samples.jsonl")
        else None  # answers without a bench report beside them
    )
    result = {
        "samples": str(args.samples),
        "samples_commit": (read_json(report_file, "bench report").get("provenance") or {}).get("commit")
        if report_file is not None and report_file.is_file()
        else None,
        "labels": len(rows),
        "agreement": {
            "all": judge_agreement(rows),
            "base": judge_agreement([r for r in rows if r.get("condition") == "base"]),
            "steered": judge_agreement([r for r in rows if r.get("condition") not in (None, "base")]),
        },
        "asr_by_reading": reading_rates(samples, rows),
        "provenance": provenance(sys.argv),
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("samples", "labels", "asr_by_reading")}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("train", "bench", "perf", "read"))
    parser.add_argument("--work", type=Path, default=Path("bench-steering"))
    parser.add_argument(
        "--artifact", type=Path, default=None, help="Steering artifact (default: WORK/artifact)."
    )
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--split", default="test")
    parser.add_argument("--conditions", default="base,safeflow,redirect")
    parser.add_argument(
        "--set", nargs="*", action="extend", default=[], help="BenchConfig overrides, KEY=JSON"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=Path, help="read: a bench's samples.jsonl")
    parser.add_argument("--out", type=Path, help="read: where to write the result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    {"train": cmd_train, "bench": cmd_bench, "perf": cmd_perf, "read": cmd_read}[args.command](args)


if __name__ == "__main__":
    main()
