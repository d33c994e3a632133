"""Run the analyses on a features directory and write their tables and figures to a folder."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.features.store import FeatureSet
from sapguard.interpret import plots
from sapguard.interpret.views import FacetViews, facet_views
from sapguard.io import atomic_write, write_json
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.specialisation import (
    Specialisation,
    analyse_specialisation,
    polytope_margins,
    suggested_names,
)

logger = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Specialisation and per-facet views of one polytope on one split, plus their figures.

    Attributes:
        split: The analysed split.
        spec: Category x facet MI and matching (unsafe rows).
        views: Per-facet views (all rows of the split).
        suggested: Analysis-derived facet names (:func:`suggested_names`).
        figures: Figure name -> PNG bytes (``facet_<k>`` for histograms).
    """

    split: str
    spec: Specialisation
    views: FacetViews
    suggested: list[str]
    figures: dict[str, bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "specialisation": self.spec.to_json(),
            "views": self.views.to_json(),
            "suggested_names": self.suggested,
        }


def check_features(poly: SafetyPolytope, features: FeatureSet) -> None:
    """Refuse features from another layer, width, token policy or base model than the polytope's."""
    man = features.manifest
    if int(man["hidden_size"]) != poly.hidden_size:
        raise ArtifactMismatchError(
            f"features have hidden size {man['hidden_size']}, the polytope {poly.hidden_size}"
        )
    layer = poly.meta.get("layer")
    if layer is not None and int(man["layer"]) != int(layer):
        raise ArtifactMismatchError(
            f"features come from layer {man['layer']}, the polytope reads layer {layer}"
        )
    for key in ("policy", "template"):
        if poly.meta.get(key) and man.get(key) and man[key] != poly.meta[key]:
            logger.warning(
                "features were extracted with %s=%s, the polytope with %s", key, man[key], poly.meta[key]
            )


def analyse(
    poly: SafetyPolytope, features: FeatureSet, *, split: str = "test", top_k: int = 5, bins: int = 10
) -> Analysis:
    """Specialisation, views and figures of ``poly`` on one split of ``features``."""
    check_features(poly, features)
    x, y, records = features.subset(split)
    margins = polytope_margins(poly, x)
    # every category of the data set, so that one without rows in this split is reported
    categories = sorted({c for r in features.records for c in r.categories})
    spec = analyse_specialisation(poly, x, y, records, bins=bins, margins=margins, categories=categories)
    views = facet_views(poly, x, y, records, k=top_k, margins=margins)
    figures = {
        "similarity": plots.similarity_heatmap(views.similarity, views.facet_names),
        "usage": plots.usage_bars(views),
        "projection": plots.projection_scatter(views),
    }
    if spec.has_categories:
        figures["heatmap_binned"] = plots.mi_heatmap(spec, mode="binned")
        figures["heatmap_fired"] = plots.mi_heatmap(spec, mode="fired")
    for k, name in enumerate(views.facet_names):
        figures[f"facet_{k}"] = plots.margin_histogram(
            views.margins[:, k], views.labels, f"facet {k}: {name}"
        )
    return Analysis(split, spec, views, suggested_names(spec), figures)


def mi_csv(spec: Specialisation, mode: str = "binned") -> str:
    """The MI matrix as CSV: one row per category, one column per facet."""
    mi = spec.mi_binned if mode == "binned" else spec.mi_fired
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["category", "rows", *spec.facet_names])
    for cat, n, row in zip(spec.categories, spec.category_rows, mi):
        writer.writerow([cat, n, *(f"{v:.6f}" for v in row)])
    return buf.getvalue()


def matching_markdown(spec: Specialisation) -> str:
    """The Hungarian matching as a markdown table."""
    lines = ["| category | rows | facet | MI binned (bits) | MI fired (bits) |", "|---|---:|---|---:|---:|"]
    rows = dict(zip(spec.categories, spec.category_rows))
    for p in spec.matching:
        lines.append(
            f"| {p['category']} | {rows[p['category']]} | {p['facet']}: {p['facet_name']} | "
            f"{p['mi_binned']:.3f} | {p['mi_fired']:.3f} |"
        )
    lines.append(f"\nChance level (95th percentile, shuffled categories): {spec.chance_mi:.3f} bits.")
    return "\n".join(lines)


def write_analysis(analysis: Analysis, directory: str | Path) -> dict[str, Path]:
    """Write ``interpret.json``, MI CSVs, ``matching.md`` and the PNG figures into ``directory``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SapError(f"{directory}: exists and is not a directory")
    written = {"json": directory / "interpret.json"}
    write_json(written["json"], analysis.to_json())
    if analysis.spec.has_categories:
        for mode in ("binned", "fired"):
            written[f"mi_{mode}"] = directory / f"mi_{mode}.csv"
            with atomic_write(written[f"mi_{mode}"]) as fh:
                fh.write(mi_csv(analysis.spec, mode))
        written["matching"] = directory / "matching.md"
        with atomic_write(written["matching"]) as fh:
            fh.write(matching_markdown(analysis.spec) + "\n")
    for name, png in analysis.figures.items():
        written[name] = plots.save_png(png, directory / f"{name}.png")
    return written
