"""Steering commands: steer-train, generate, chat, bench."""

from __future__ import annotations

from pathlib import Path

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


def _load(polytope: Path, model: str | None, device: str) -> tuple[object, object]:
    from sapguard.models.loading import load_model
    from sapguard.polytope.artifact import load_polytope

    poly = load_polytope(polytope)
    base = (poly.meta.get("base_model") or {}).get("id") or "default"
    return load_model(model or base, device=device), poly


def _mode_options(
    margin: float | None, max_steps: int | None, lr: float | None, alpha: float | None, mode: str
) -> dict[str, object]:
    if mode == "safeflow":
        return {"margin": margin, "max_steps": max_steps, "lr": lr}
    if mode == "redirect":
        return {"alpha": alpha}
    return {}


def register(app: typer.Typer) -> None:
    """Add the steering commands to ``app``."""

    @app.command("steer-train")
    @handle_errors
    def steer_train(
        out: Path = typer.Option(..., "--out", "-o", help="Polytope directory to write."),
        data: Path | None = typer.Option(
            None,
            "--data",
            "-d",
            help="JSONL of (prompt, response, is_safe[, split]) instead of the default steering set.",
        ),
        layer: int = typer.Option(20, "--layer", "-l", help="Layer L = output of decoder block L."),
        model: str = typer.Option("default", "--model", "-m"),
        records_out: Path | None = typer.Option(
            None, "--records-out", help="Also write the steering records (JSONL)."
        ),
        features_dir: Path | None = typer.Option(
            None, "--features-dir", help="Keep the response-token features here (usable by `sap train`)."
        ),
        n_harmful: int = typer.Option(80, "--n-harmful", help="Harmful train prompts (validation: a third)."),
        n_benign: int = typer.Option(80, "--n-benign"),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
        prompt_rows: bool = typer.Option(
            True,
            "--prompt-rows/--no-prompt-rows",
            help="Add last-prompt-token rows of the default corpus (the gate).",
        ),
        device: str = typer.Option("auto", "--device"),
        verbose: bool = VERBOSE_OPTION,
    ) -> None:
        """Build the generation-time steering set and train a steering polytope on it."""
        setup_logging(verbose)
        from sapguard.data.records import read_jsonl, write_jsonl
        from sapguard.data.splits import split_by_group
        from sapguard.models.loading import load_model
        from sapguard.steer.dataset import (
            DEFAULT_MODEL_STEERING,
            build_steering_records,
            train_steering_polytope,
        )

        lm = load_model(model, device=device)
        if data is not None:
            records = read_jsonl(data)
            if any(r.split is None for r in records):
                records = split_by_group(records)
        else:
            from sapguard.data.default_corpus import build_default_corpus

            sizes = {
                "train": (n_harmful, n_benign),
                "validation": (max(n_harmful // 3, 1), max(n_benign // 3, 1)),
            }
            records = build_steering_records(
                lm, build_default_corpus(), sizes=sizes, max_new_tokens=max_new_tokens, show_progress=True
            )
        if records_out:
            write_jsonl(records_out, records)
        prompts = None
        if prompt_rows:
            from sapguard.data.default_corpus import build_default_corpus

            prompts = [r for r in build_default_corpus() if r.split in ("train", "validation")]
        poly = train_steering_polytope(
            lm, records, layer, features_dir=features_dir, prompt_records=prompts, show_progress=True
        )
        if model == "default" and layer == 20:
            poly.meta["steering"].update(DEFAULT_MODEL_STEERING)
        poly.save_pretrained(out)
        typer.echo(f"wrote {out} (layer {layer}, {poly.num_facets} facets, {len(records)} records)")

    @app.command("generate")
    @handle_errors
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
        lr: float | None = typer.Option(None, "--lr", help="SafeFlow step size."),
        alpha: float | None = typer.Option(None, "--alpha", help="Redirect scale."),
        trace: bool = typer.Option(
            False, "--trace", help="Print (or include in --json) the per-token trace."
        ),
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
            threshold=threshold,  # type: ignore[arg-type]
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            refusal_text=refusal_text or DEFAULT_REFUSAL,
            mode_options=_mode_options(margin, max_steps, lr, alpha, mode),
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

    @app.command("chat")
    @handle_errors
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
            )[0]  # type: ignore[arg-type]
            s = g.summary
            typer.echo(
                f"bot> {g.response}\n     [{mode}: fired {s.fired_tokens}/{s.tokens}, edited {s.edited_tokens}]"
            )

    @app.command("bench")
    @handle_errors
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
        threshold: float | None = typer.Option(None, "--threshold"),
        model: str | None = typer.Option(None, "--model", "-m"),
        device: str = typer.Option("auto", "--device"),
        json_out: bool = JSON_OPTION,
        verbose: bool = VERBOSE_OPTION,
    ) -> None:
        """Attack success, over-refusal, KL and MMLU-format accuracy: base vs steering vs baseline defences."""
        setup_logging(verbose)
        from sapguard.bench.judges import HFClassifierJudge
        from sapguard.bench.mmlu import load_questions
        from sapguard.bench.run import BenchConfig, markdown, run_bench
        from sapguard.data.default_corpus import build_default_corpus
        from sapguard.io import atomic_write, write_json

        cfg = BenchConfig.preset(
            "quick" if quick else preset,
            split=split,
            threshold=threshold,
            conditions=tuple(c.strip() for c in conditions.split(",")) if conditions else None,
        )
        lm, poly = _load(polytope, model, device)
        judge = HFClassifierJudge(harm_classifier, unsafe_label) if harm_classifier else None
        questions = load_questions(mmlu) if mmlu else None
        report = run_bench(
            lm,
            poly,
            build_default_corpus(),
            cfg,
            questions=questions,
            harm_judge=judge,
            show_progress=not json_out,
        )  # type: ignore[arg-type]
        write_json(out / "report.json", report)
        with atomic_write(out / "report.md") as fh:
            fh.write(markdown(report))
        if json_out:
            emit_json({k: v for k, v in report.items() if k != "samples"})
        else:
            typer.echo(markdown(report))
            typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'}")
