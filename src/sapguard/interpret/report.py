"""One self-contained HTML report: images inline as data URIs, no scripts, no network at view time.

Sections (element ids): ``summary`` (training), ``metrics`` (detection and baselines),
``specialisation`` (heatmap and matching), ``facets`` (one card per facet), ``figures`` (usage,
similarity, projection) and ``steering`` (only with a bench result).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapguard.errors import SapError
from sapguard.features.store import FeatureSet
from sapguard.interpret.pipeline import Analysis, analyse, write_analysis
from sapguard.io import atomic_write
from sapguard.polytope.model import SafetyPolytope

logger = logging.getLogger(__name__)

SECTIONS = ("summary", "metrics", "specialisation", "facets", "figures")
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6dd;border-left:4px solid #e0b000;padding:.4em .8em;margin:.5em 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em}.card h3{margin:.2em 0}
.card li{margin:.3em 0;font-size:.88em;white-space:pre-wrap}.tag{color:#666;font-size:.85em}
img{max-width:100%}
"""


def esc(value: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """Numbers to 3 decimals, everything else as text."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[Any]) -> str:
    """A plain HTML table; numeric cells right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(fmt(c))}</td>'
            if isinstance(c, (int, float))
            else f"<td>{esc(fmt(c))}</td>"
            for c in r
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inline as a base64 data URI."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def notes_html(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def markdown_table(text: str) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the first pipe table in ``text`` (None if there is none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    cells = [c for c in cells if not all(set(x) <= set("-: ") and x for x in c)]
    return (cells[0], cells[1:]) if cells else None


def summary_section(poly: SafetyPolytope, features: FeatureSet, split: str) -> str:
    meta = poly.meta
    base = meta.get("base_model") or {}
    cal = meta.get("calibration") or {}
    rows: list[list[Any]] = [
        ["base model", base.get("id", "unknown")],
        [
            "layer / token policy / template",
            f"{meta.get('layer')} / {meta.get('policy')} / {meta.get('template')}",
        ],
        ["facets", poly.num_facets],
        ["concept encoder", poly.encoder.spec.to_dict()],
        ["decision offset (target FPR)", f"{cal.get('offset', 0.0):.4g} ({cal.get('target_fpr', 'n/a')})"],
        ["best epoch", meta.get("best_epoch", "n/a")],
        [
            "analysed features",
            f"{features.manifest.get('model', {})} layer {features.manifest['layer']}, split {split!r}",
        ],
    ]
    for key in ("train_config", "training_data", "validation_metrics"):
        if meta.get(key):
            rows.append([key.replace("_", " "), meta[key]])
    history = meta.get("history") or []
    out = "<h2>Training summary</h2>" + html_table(rows, ["", "value"])
    if history:
        cols = [c for c in history[0] if c != "epoch"]
        out += (
            f"<details><summary>Training history ({len(history)} epochs)</summary>"
            + html_table([[h.get("epoch")] + [h.get(c) for c in cols] for h in history], ["epoch", *cols])
            + "</details>"
        )
    return f'<section id="summary">{out}</section>'


def metrics_section(metrics: dict[str, Any] | None, reason: str | None) -> str:
    out = "<h2>Detection metrics and baselines</h2>"
    if not metrics or not isinstance(metrics.get("detectors"), dict):
        out += notes_html([reason or "no metrics given (pass --metrics metrics.json from `sap eval`)"])
        return f'<section id="metrics">{out}</section>'
    cols = ["accuracy", "precision", "recall", "f1", "fpr", "auroc", "pr_auc"]
    out += f"<p>Split {esc(metrics.get('split', '?'))}; unsafe is the positive class; thresholds from validation data "
    out += f"at a target false-positive rate of {esc(metrics.get('target_fpr', '?'))}.</p>"
    out += html_table(
        [[name, *(m.get(c) for c in cols)] for name, m in metrics["detectors"].items()], ["detector", *cols]
    )
    per_cat = metrics.get("per_category_recall") or {}
    if per_cat:
        out += "<h3>Polytope recall per category</h3>"
        out += html_table(
            [[c, v.get("n"), v.get("recall")] for c, v in per_cat.items()],
            ["category", "unsafe rows", "recall"],
        )
    return f'<section id="metrics">{out}</section>'


def specialisation_section(analysis: Analysis) -> str:
    spec = analysis.spec
    out = "<h2>Facet specialisation</h2>"
    out += (
        f"<p>Mutual information (bits) between each category indicator and each facet's margin on the "
        f"{spec.rows} {'unsafe ' if spec.unsafe_only else ''}rows of split {esc(analysis.split)!s}; categories are "
        "matched one-to-one to facets by the Hungarian method (red boxes).</p>"
    )
    out += notes_html(spec.notes)
    if spec.has_categories:
        out += img(analysis.figures["heatmap_binned"], "MI heatmap, binned margins")
        rows = dict(zip(spec.categories, spec.category_rows))
        out += html_table(
            [
                [
                    p["category"],
                    rows[p["category"]],
                    f"{p['facet']}: {p['facet_name']}",
                    analysis.suggested[p["facet"]],
                    p["mi_binned"],
                    p["mi_fired"],
                ]
                for p in spec.matching
            ],
            ["category", "rows", "facet", "suggested name", "MI binned", "MI fired"],
        )
        out += f"<p>Chance level (95th percentile of MI with categories shuffled across rows): {spec.chance_mi:.3f} bits.</p>"
        out += img(analysis.figures["heatmap_fired"], "MI heatmap, fired or not")
    return f'<section id="specialisation">{out}</section>'


def facets_section(analysis: Analysis) -> str:
    views = analysis.views
    cards = []
    for k, name in enumerate(views.facet_names):
        items = "".join(
            f'<li><b>{t["margin"]:+.2f}</b> <span class="tag">[{"safe" if t["is_safe"] else "unsafe"}'
            f"{': ' + esc(', '.join(t['categories'])) if t['categories'] else ''}]</span> {esc(t['text'])}</li>"
            for t in views.top_texts[k]
        )
        suggested = analysis.suggested[k]
        cards.append(
            f'<div class="card" id="facet-{k}"><h3>{k}: {esc(name)}</h3>'
            f'<p class="tag">fires on {int(views.fired[k])} rows, most violated on {int(views.first[k])} flagged rows'
            f"{'; analysis suggests ' + esc(suggested) if suggested != name else ''}</p>"
            f"{img(analysis.figures[f'facet_{k}'], f'margins of facet {k}')}<ol>{items}</ol></div>"
        )
    return f'<section id="facets"><h2>Facets</h2><div class="cards">{"".join(cards)}</div></section>'


def figures_section(analysis: Analysis) -> str:
    out = "<h2>Facet usage, similarity and feature projection</h2>"
    for name, alt in (
        ("usage", "facet usage"),
        ("similarity", "facet similarity"),
        ("projection", "PCA projection"),
    ):
        out += f"<figure>{img(analysis.figures[name], alt)}</figure>"
    return f'<section id="figures">{out}</section>'


def steering_section(bench: Any) -> str:
    out = "<h2>Steering</h2>"
    rows = bench if isinstance(bench, list) else None
    if isinstance(bench, dict):
        parsed = (
            markdown_table(bench["table_markdown"]) if isinstance(bench.get("table_markdown"), str) else None
        )
        if parsed:
            return f'<section id="steering">{out}{html_table(parsed[1], parsed[0])}</section>'
        rows = next((v for k in ("rows", "table", "results") if isinstance(v := bench.get(k), list)), None)
    if rows and all(isinstance(r, dict) for r in rows):
        header = list(dict.fromkeys(k for r in rows for k in r))
        return f'<section id="steering">{out}{html_table([[r.get(h, "") for h in header] for r in rows], header)}</section>'
    return (
        f'<section id="steering">{out}<pre>{esc(json.dumps(bench, indent=2, sort_keys=True))}</pre></section>'
    )


def render_html(
    poly: SafetyPolytope,
    features: FeatureSet,
    analysis: Analysis,
    *,
    metrics: dict[str, Any] | None = None,
    metrics_note: str | None = None,
    bench: Any = None,
) -> str:
    """The report as one HTML string."""
    base = (poly.meta.get("base_model") or {}).get("id", "unknown")
    parts = [
        summary_section(poly, features, analysis.split),
        metrics_section(metrics, metrics_note),
        specialisation_section(analysis),
        facets_section(analysis),
        figures_section(analysis),
    ]
    if bench is not None:
        parts.append(steering_section(bench))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Safety polytope report: {esc(base)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Safety polytope report</h1><p>{poly.num_facets} facets over layer {esc(poly.meta.get('layer'))} of "
        f"<code>{esc(base)}</code>. Generated by sapguard; self-contained (no network needed).</p>"
        + "".join(parts)
        + "</body></html>\n"
    )


def build_report(
    poly: SafetyPolytope,
    features: FeatureSet,
    out: str | Path,
    *,
    split: str = "test",
    metrics: dict[str, Any] | None = None,
    bench: Any = None,
    top_k: int = 5,
) -> tuple[Path, Analysis]:
    """Analyse ``poly`` on ``features`` and write ``out`` (HTML) plus its PNGs in ``<out stem>_files/``.

    Without ``metrics`` the detection metrics are computed here (:func:`sapguard.evaluate.evaluate`,
    which fits the baselines on the train split); when that is impossible the section says why.

    Returns:
        The HTML path and the analysis.
    """
    out = Path(out)
    if out.is_dir():
        raise SapError(f"{out}: is a directory; give the report's .html file name")
    analysis = analyse(poly, features, split=split, top_k=top_k)
    note = None
    if metrics is None:
        from sapguard.evaluate import evaluate

        try:
            metrics = evaluate(poly, features, split=split)
        except SapError as err:
            note = f"detection metrics not computed: {err}"
            logger.warning(note)
    write_analysis(analysis, out.with_name(f"{out.stem}_files"))
    with atomic_write(out) as fh:
        fh.write(render_html(poly, features, analysis, metrics=metrics, metrics_note=note, bench=bench))
    return out, analysis
