"""`sap interpret`, `sap report` and `sap attribute`: what each facet learned."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sapguard.cli.common import JSON_OPTION, VERBOSE_OPTION, emit_json, handle_errors, setup_logging, table
from sapguard.errors import SapError
from sapguard.io import read_json

if TYPE_CHECKING:
    from sapguard.features.store import FeatureSet
    from sapguard.polytope.model import SafetyPolytope
    from sapguard.polytope.specialisation import Specialisation

POLYTOPE = typer.Option(..., "--polytope", "-p", help="Polytope artifact directory.")
FEATURES = typer.Option(
    ..., "--features", "-f", help="Features directory from `sap extract` (with categories for MI)."
)
SPLIT = typer.Option("test", "--split", help="Split of the features to analyse.")
TOP_K = typer.Option(5, "--top-k", min=1, help="Texts shown per facet.")
OUT_DIR = typer.Option(..., "--out", "-o", help="Folder for interpret.json, MI tables and PNG figures.")
OUT_HTML = typer.Option(
    ..., "--out", "-o", help="The HTML file to write; PNGs go to <name>_files/ beside it."
)
METRICS = typer.Option(None, "--metrics", help="metrics.json from `sap eval` (else computed here).")
BENCH = typer.Option(None, "--bench", help="Steering bench result JSON from `sap bench`.")
RENAME = typer.Option(False, "--rename", help="Write the analysis-derived facet names into the artifact.")
FACET = typer.Option(..., "--facet", help="Facet name or index.")
HTML_OUT = typer.Option(None, "--html", help="Also write the highlighted sentence as HTML.")
TEXT = typer.Argument(..., help="The text to attribute.")


def _load(polytope: Path, features: Path) -> tuple[SafetyPolytope, FeatureSet]:
    from sapguard.features.store import load_features
    from sapguard.polytope.artifact import load_polytope

    return load_polytope(polytope), load_features(features)


def _matching_rows(spec: Specialisation) -> list[list[str]]:
    rows = dict(zip(spec.categories, spec.category_rows))
    return [
        [
            p["category"],
            str(rows[p["category"]]),
            f"{p['facet']}: {p['facet_name']}",
            f"{p['mi_binned']:.3f}",
            f"{p['mi_fired']:.3f}",
        ]
        for p in spec.matching
    ]


def interpret(
    polytope: Path = POLYTOPE,
    features: Path = FEATURES,
    out: Path = OUT_DIR,
    split: str = SPLIT,
    top_k: int = TOP_K,
    rename: bool = RENAME,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Facet specialisation (category x facet MI, Hungarian matching), per-facet views and figures."""
    from sapguard.interpret.naming import apply_facet_names
    from sapguard.interpret.pipeline import analyse, write_analysis

    setup_logging(verbose)
    poly, feats = _load(polytope, features)
    analysis = analyse(poly, feats, split=split, top_k=top_k)
    written = write_analysis(analysis, out)
    renamed = None
    if rename:
        if not analysis.spec.has_categories:
            raise SapError(f"{features}: no category labels, so there are no analysis-derived names to write")
        renamed = {"old": apply_facet_names(polytope, analysis.suggested), "new": analysis.suggested}
    if as_json:
        emit_json(
            {**analysis.to_json(), "files": {k: str(v) for k, v in written.items()}, "renamed": renamed}
        )
        return
    spec = analysis.spec
    for note in spec.notes:
        typer.echo(f"note: {note}")
    if spec.has_categories:
        typer.echo(table(_matching_rows(spec), ["category", "rows", "facet", "MI binned", "MI fired"]))
        typer.echo(f"chance level (shuffled categories, 95th percentile): {spec.chance_mi:.3f} bits")
    typer.echo(
        table(
            [
                [f"{k}: {n}", str(f), analysis.suggested[k]]
                for k, (n, f) in enumerate(zip(spec.facet_names, analysis.views.fired.tolist()))
            ],
            ["facet", "fires (all rows)", "suggested name"],
        )
    )
    if renamed:
        typer.echo(f"facet names written to {polytope}/config.json")
    typer.echo(f"wrote {len(written)} files to {out}")


def report(
    polytope: Path = POLYTOPE,
    features: Path = FEATURES,
    out: Path = OUT_HTML,
    metrics: Path | None = METRICS,
    bench: Path | None = BENCH,
    split: str = SPLIT,
    top_k: int = TOP_K,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Write one self-contained HTML report (training, metrics, specialisation, facets, steering)."""
    from sapguard.interpret.report import build_report

    setup_logging(verbose)
    metrics_obj = read_json(metrics, "metrics", require_object=False) if metrics else None
    bench_obj = read_json(bench, "bench", require_object=False) if bench else None
    poly, feats = _load(polytope, features)
    path, analysis = build_report(
        poly, feats, out, split=split, metrics=metrics_obj, bench=bench_obj, top_k=top_k
    )
    summary = {
        "report": str(path),
        "figures": str(path.with_name(f"{path.stem}_files")),
        "notes": analysis.spec.notes,
        "matching": analysis.spec.matching,
    }
    if as_json:
        emit_json(summary)
        return
    for note in analysis.spec.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {path} (figures in {summary['figures']})")


def attribute(
    text: str = TEXT,
    polytope: Path = POLYTOPE,
    facet: str = FACET,
    html_out: Path | None = HTML_OUT,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Leave-one-word-out attribution: which words move a facet's margin most (on the real model)."""
    from sapguard.interpret.attribution import highlight_html, word_attribution
    from sapguard.io import atomic_write
    from sapguard.polytope.artifact import load_polytope

    setup_logging(verbose)
    poly = load_polytope(polytope)
    margin, words = word_attribution(poly, text, facet)
    if html_out is not None:
        with atomic_write(html_out) as fh:
            fh.write(f'<!DOCTYPE html><meta charset="utf-8">{highlight_html(text, words)}\n')
    if as_json:
        emit_json({"text": text, "facet": facet, "margin": margin, "words": [w.to_json() for w in words]})
        return
    typer.echo(f"facet {facet}: margin {margin:+.3f} ({'fires' if margin > 0 else 'does not fire'})")
    ranked = sorted(words, key=lambda w: -abs(w.delta))
    typer.echo(
        table([[w.word, f"{w.delta:+.3f}"] for w in ranked], ["word", "effect (+: raises the margin)"])
    )


def register(app: typer.Typer) -> None:
    """Add the interpretation commands to the `sap` app."""
    app.command("interpret")(handle_errors(interpret))
    app.command("report")(handle_errors(report))
    app.command("attribute")(handle_errors(attribute))
