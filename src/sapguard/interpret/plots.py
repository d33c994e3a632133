"""Matplotlib figures (Agg backend, PNG) for the specialisation analysis and the facet views.

Every function returns PNG bytes; :func:`save_png` writes them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sapguard.errors import SapError
from sapguard.interpret.views import FacetViews
from sapguard.io import atomic_write
from sapguard.polytope.specialisation import Specialisation

DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_png(data: bytes, path: str | Path) -> Path:
    """Write PNG bytes atomically; returns the path."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def mi_heatmap(spec: Specialisation, *, mode: str = "binned") -> bytes:
    """Categories (rows) x matched facets (columns, in matching order, then the unmatched ones)."""
    if not spec.has_categories:
        raise SapError("the MI heatmap needs category labels; the data carries none")
    mi = spec.mi_binned if mode == "binned" else spec.mi_fired
    matched = [p["facet"] for p in spec.matching]
    order = matched + [k for k in range(len(spec.facet_names)) if k not in matched]
    cat_order = [spec.categories.index(p["category"]) for p in spec.matching]
    cat_order += [j for j in range(len(spec.categories)) if j not in cat_order]
    data = mi[np.ix_(cat_order, order)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(order), 1.2 + 0.4 * max(1, len(cat_order))))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(
        range(len(order)), [f"{k}: {spec.facet_names[k]}" for k in order], rotation=60, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(cat_order)), [spec.categories[j] for j in cat_order], fontsize=8)
    for i in range(len(spec.matching)):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("facet (matched first)")
    ax.set_ylabel("category")
    ax.set_title(f"MI (bits), {'quantile-binned margin' if mode == 'binned' else 'fired / not fired'}")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def margin_histogram(margins: np.ndarray, labels: np.ndarray, title: str) -> bytes:
    """One facet's margins on safe vs unsafe rows; the firing threshold (0) dashed."""
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    finite = margins[np.isfinite(margins)]
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=30)
    for lab, name, colour in ((0, "safe", "tab:blue"), (1, "unsafe", "tab:red")):
        values = margins[labels == lab]
        if values.size:
            ax.hist(values, bins=edges.tolist(), alpha=0.55, color=colour, label=f"{name} ({values.size})")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("margin (> 0 fires)")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def similarity_heatmap(similarity: np.ndarray, names: Sequence[str]) -> bytes:
    """Facet-facet cosine similarity of the normals."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.5 + 0.4 * n, 1.2 + 0.4 * n))
    im = ax.imshow(similarity, cmap="coolwarm", vmin=-1, vmax=1)
    labels = [f"{k}: {name}" for k, name in enumerate(names)]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_title("cosine similarity of facet normals")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def usage_bars(views: FacetViews) -> bytes:
    """Per facet: rows on which it fires, and flagged rows on which it is the most violated."""
    n = len(views.facet_names)
    pos = np.arange(n)
    fig, ax = plt.subplots(figsize=(1.5 + 0.4 * n, 3.0))
    ax.bar(pos - 0.2, views.fired, width=0.4, label="fires")
    ax.bar(pos + 0.2, views.first, width=0.4, label="most violated")
    ax.set_xticks(
        pos, [f"{k}: {name}" for k, name in enumerate(views.facet_names)], rotation=60, ha="right", fontsize=7
    )
    ax.set_ylabel("rows")
    ax.set_title("facet usage")
    ax.legend(fontsize=7)
    return _png(fig)


def projection_scatter(views: FacetViews) -> bytes:
    """2-D PCA of the features, coloured by the most violated facet of flagged rows."""
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    quiet = views.firing < 0
    grey = views.projection[quiet]
    ax.scatter(grey[:, 0], grey[:, 1], s=6, c="lightgrey", label="not flagged")
    cmap = plt.get_cmap("tab20")
    for k in np.unique(views.firing[~quiet]).tolist():
        pts = views.projection[views.firing == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=cmap(k % 20), label=f"{k}: {views.facet_names[k]}")
    ev = views.explained
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    ax.set_title("features (PCA), coloured by firing facet")
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)
