"""GPU checks of the transformers path and of SafeFlow's CUDA-graph form, against a CPU reference.

Two steps. On the CPU (fp32, the reference every GPU number is compared with):

    python benchmarks/bench_gpu.py reference --out benchmarks/gpu_reference

writes ``reference.json`` (detector scores of bench prompts, SafeFlow greedy token ids) and
``states.safetensors`` (the steering gate's layer states at the last prompt position of harmful
requests). On a CUDA machine:

    python benchmarks/bench_gpu.py check --reference benchmarks/gpu_reference --out results_gpu.json \
        --parts graph,detect,steer,speed

- ``graph``: the gate and SafeFlow's edit as one fixed-shape step (``solve_static``: no host
  synchronisation, no data-dependent shapes) captured in a ``torch.cuda.CUDAGraph`` and replayed on
  the reference states; compared with the eager dynamic solver (``solve``) and timed per call.
  Needs no model, only the states.
- ``detect``: the shipped detector's ``scan()`` scores on the GPU in fp32 and bf16 against the
  CPU's; verdict agreement.
- ``steer``: ``generate()`` under SafeFlow on the GPU in fp32, token for token against the CPU.
- ``speed``: generated tokens/s of plain ``generate()`` and of the hook (never firing on benign
  prompts; firing on harmful ones), 1 and 32 concurrent prompts, fp32 and bf16, rounds
  interleaved (ratios within a round).

Every part writes its result as soon as it finishes (atomically), with the commit and command.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sapguard.bench.run import provenance
from sapguard.detect import scan
from sapguard.io import atomic_write
from sapguard.models.chat import encode_prompt, resolve_template
from sapguard.models.loading import LoadedModel, load_model
from sapguard.polytope.artifact import default_polytope
from sapguard.steer.artifact import load_steering
from sapguard.steer.generate import generate
from sapguard.steer.hook import hook_settings
from sapguard.steer.modes import SafeFlow, make_mode
from sapguard.steer.solver import polytope_on, solve_static

HERE = Path(__file__).resolve().parent
STEERING = HERE.parent / "src" / "sapguard" / "assets" / "steering"
SAMPLES = HERE / "results_steering_v5_samples.jsonl"
NEW_TOKENS = 32
DEVICE = "cuda"
"""Where ``check`` runs the model parts (``--device``; ``cpu`` only to smoke-test this script)."""


def bench_prompts() -> dict[str, list[str]]:
    """Direct harmful, benign and edgy-benign requests of the steering bench (base rows, file order)."""
    sets: dict[str, list[str]] = {"direct": [], "benign": [], "edgy_benign": []}
    for line in SAMPLES.read_text().splitlines():
        row = json.loads(line)
        if row["condition"] == "base" and row["set"] in sets:
            sets[row["set"]].append(row["request"])
    return sets


def detect_prompts() -> list[str]:
    sets = bench_prompts()
    return sets["direct"][:32] + sets["benign"][:16] + sets["edgy_benign"][:16]


def steer_prompts() -> list[str]:
    sets = bench_prompts()
    return sets["direct"][:12] + sets["benign"][:6] + sets["edgy_benign"][:6]


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(data, f, indent=1, sort_keys=True)


def steering_states(lm: LoadedModel, gate: Any, prompts: list[str]) -> torch.Tensor:
    """The gate layer's states at the last prompt position (what the hook reads at generated index 0)."""
    template = resolve_template(lm.tokenizer, "auto")
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(lm.tokenizer, prompt, template)], device=lm.device)
            hidden = lm.model(ids, output_hidden_states=True).hidden_states[int(gate.meta["layer"])]
            rows.append(hidden[0, -1].float().cpu())
    return torch.stack(rows)


def cmd_reference(args: argparse.Namespace) -> None:
    lm = load_model("default", device="cpu", dtype="float32")
    detector, gate = default_polytope(), load_steering(STEERING)
    scores = [v.score for v in scan(detector, detect_prompts(), lm=lm)]
    gens = generate(lm, steer_prompts(), gate, "safeflow", max_new_tokens=NEW_TOKENS)
    states = steering_states(lm, gate, bench_prompts()["direct"][:64])
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"states": states.contiguous()}, str(args.out / "states.safetensors"))
    write(
        args.out / "reference.json",
        {
            "detect_scores": scores,
            "steer_token_ids": [g.token_ids for g in gens],
            "steer_edited": [g.summary.edited_tokens for g in gens],
            "new_tokens": NEW_TOKENS,
            **provenance(),
        },
    )


def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, repeats: int) -> float:
    """Mean milliseconds per call (CUDA-synchronised around the loop)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / repeats


def part_graph(ref: Path) -> dict[str, Any]:
    """The gate + SafeFlow edit as one CUDA graph, against the eager dynamic solver."""
    device = torch.device("cuda")
    gate = load_steering(STEERING)
    threshold = float(hook_settings(gate)["threshold"])
    mode = make_mode("safeflow", gate)
    assert isinstance(mode, SafeFlow)
    target, basis = mode.constraints(gate, device)
    gate_dev = polytope_on(gate, device)
    h = load_file(str(ref / "states.safetensors"))["states"].to(device)

    def step(x: torch.Tensor, max_steps: int = mode.max_steps) -> tuple[torch.Tensor, torch.Tensor]:
        fire = gate_dev.margins(x).max(-1).values > threshold
        res = solve_static(
            target,
            x,
            margin=mode.margin,
            lambda_safe=mode.lambda_safe,
            lambda_unsafe=mode.lambda_unsafe,
            max_steps=max_steps,
            overshoot=mode.overshoot,
            basis=basis,
            nonnegative=mode.nonnegative,
        )
        return torch.where(fire[:, None], res.hidden, x), fire

    def dynamic(x: torch.Tensor) -> torch.Tensor:
        fire = gate_dev.margins(x).max(-1).values > threshold
        out = x.clone()
        if bool(fire.any()):
            out[fire] = mode.edit(x[fire], gate_dev).hidden
        return out

    with torch.inference_mode():
        static_in = h.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                step(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_fire = step(static_in)
        results: dict[str, Any] = {"rows": len(h), "max_steps": mode.max_steps}
        # replay on the states in reverse order (new data through the same buffers)
        for name, data in (("forward", h), ("reversed", h.flip(0))):
            static_in.copy_(data)
            graph.replay()
            torch.cuda.synchronize()
            eager_static, _ = step(data)
            eager_dynamic = dynamic(data)
            inside = target.margins(static_out[static_fire]).max(-1).values
            results[name] = {
                "fired": int(static_fire.sum()),
                "graph_vs_eager_static_max_abs": float((static_out - eager_static).abs().max()),
                "graph_vs_dynamic_max_abs": float((static_out - eager_dynamic).abs().max()),
                "edited_rows_inside_target_with_margin": int((inside <= -mode.margin + 1e-4).sum()),
                "unfired_rows_bit_identical": bool(torch.equal(static_out[~static_fire], data[~static_fire])),
            }
        # a graph with the step budget these states need (the artifact's 50 is a ceiling)
        short_in = h.clone()
        short = torch.cuda.CUDAGraph()
        step(short_in, 4)
        with torch.cuda.graph(short):
            short_out, short_fire = step(short_in, 4)
        short.replay()
        inside = target.margins(short_out[short_fire]).max(-1).values <= -mode.margin + 1e-4
        results["four_steps"] = {
            "edited_rows_inside_target_with_margin": int(inside.sum()),
            "fired": int(short_fire.sum()),
        }
        results["ms_per_call"] = {
            "dynamic_eager": _timed(lambda: dynamic(h), 50),
            "static_eager": _timed(lambda: step(h), 50),
            "static_graph_replay": _timed(graph.replay, 200),
            "static_4_steps_graph_replay": _timed(short.replay, 200),
        }
    return results


def part_detect(ref: dict[str, Any]) -> dict[str, Any]:
    detector = default_polytope()
    prompts = detect_prompts()
    cpu = torch.tensor(ref["detect_scores"])
    out: dict[str, Any] = {"prompts": len(prompts)}
    for dtype in ("float32", "bfloat16"):
        lm = load_model("default", device=DEVICE, dtype=dtype)
        got = torch.tensor([v.score for v in scan(detector, prompts, lm=lm)])
        out[dtype] = {
            "max_abs_score_diff_vs_cpu_fp32": float((got - cpu).abs().max()),
            "mean_abs_score_diff_vs_cpu_fp32": float((got - cpu).abs().mean()),
            "verdicts_equal": int(((got > 0) == (cpu > 0)).sum()),
        }
        del lm
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    return out


def part_steer(ref: dict[str, Any]) -> dict[str, Any]:
    lm = load_model("default", device=DEVICE, dtype="float32")
    gate = load_steering(STEERING)
    gens = generate(lm, steer_prompts(), gate, "safeflow", max_new_tokens=ref["new_tokens"])
    same, first_diff = 0, []
    for g, want in zip(gens, ref["steer_token_ids"]):
        if g.token_ids == want:
            same += 1
        else:
            n = next(
                (i for i, (a, b) in enumerate(zip(g.token_ids, want)) if a != b),
                min(len(g.token_ids), len(want)),
            )
            first_diff.append(n)
    edited = [g.summary.edited_tokens for g in gens]
    return {
        "prompts": len(gens),
        "token_identical": same,
        "first_divergence_of_the_others": first_diff,
        "edited_tokens_equal": sum(a == b for a, b in zip(edited, ref["steer_edited"])),
        "rows_edited_gpu": sum(e > 0 for e in edited),
        "rows_edited_cpu": sum(e > 0 for e in ref["steer_edited"]),
    }


def part_speed(rounds: int, single: int, on_cell: Any = None) -> dict[str, Any]:
    """Tokens/s per (dtype, concurrency) cell; ``single`` prompts one at a time, 32 at once; ``on_cell(out)`` after each cell."""
    gate = load_steering(STEERING)
    sets = bench_prompts()
    benign, harmful = sets["benign"][:32], sets["direct"][:32]
    out: dict[str, Any] = {"new_tokens": 64, "rounds": rounds}
    for dtype in ("bfloat16", "float32"):
        lm = load_model("default", device=DEVICE, dtype=dtype)
        for batch in (1, 32):
            n = single if batch == 1 else 32
            cases = {
                "plain_benign": (benign[:n], None, None),
                "hook_never_firing": (benign[:n], gate, "safeflow"),
                "plain_harmful": (harmful[:n], None, None),
                "hook_firing": (harmful[:n], gate, "safeflow"),
            }
            rates: dict[str, list[float]] = {k: [] for k in cases}
            fired: dict[str, int] = {}
            for prompts, poly, mode in cases.values():  # warm-up (CUDA start-up, allocator)
                generate(lm, prompts[:batch], poly, mode, max_new_tokens=8, batch_size=batch)
            for _ in range(rounds):
                for name, (prompts, poly, mode) in cases.items():
                    _sync()
                    start = time.perf_counter()
                    gens = generate(lm, prompts, poly, mode, max_new_tokens=64, batch_size=batch)
                    _sync()
                    rates[name].append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - start))
                    fired[name] = sum(g.summary.edited_tokens > 0 for g in gens)
            out[f"{dtype}_batch{batch}"] = {
                "tokens_per_s_median": {k: statistics.median(v) for k, v in rates.items()},
                "never_firing_over_plain": statistics.median(
                    a / b for a, b in zip(rates["hook_never_firing"], rates["plain_benign"])
                ),
                "firing_over_plain": statistics.median(
                    a / b for a, b in zip(rates["hook_firing"], rates["plain_harmful"])
                ),
                "rows_edited": fired,
            }
            if on_cell is not None:
                on_cell(out)
        del lm
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    return out


def cmd_check(args: argparse.Namespace) -> None:
    ref_json = json.loads((args.reference / "reference.json").read_text())
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if DEVICE != "cpu" else "cpu",
        "torch": torch.__version__,
        "reference_commit": ref_json.get("commit"),
        **provenance(),
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    parts = {
        "graph": lambda: part_graph(args.reference),
        "detect": lambda: part_detect(ref_json),
        "steer": lambda: part_steer(ref_json),
        "speed": lambda: part_speed(
            args.rounds, args.single, lambda partial: write(args.out, result | {"speed": partial})
        ),
    }
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            result[name] = parts[name]()
        except Exception as exc:  # a part that fails is reported, the others still run
            logging.exception("part %s failed", name)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
        write(args.out, result)
        print(json.dumps({name: result[name]})[:2000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("reference", "check"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path, default=HERE / "gpu_reference")
    parser.add_argument("--parts", default="graph,detect,steer,speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--single", type=int, default=4, help="speed: prompts generated one at a time")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    logging.basicConfig(level=logging.WARNING)
    if args.command == "reference":
        cmd_reference(args)
    else:
        cmd_check(args)


if __name__ == "__main__":
    main()
