"""Facet specialisation: mutual information between harm categories and facet violations; facet names.

For each category c and facet k, MI(1[row carries c]; violation_k) is computed two ways:

- ``binned``: the facet's margin discretised into quantile bins (ties merged, so a constant
  margin is one bin and carries no information);
- ``fired``: the facet fires (margin > 0) or not.

Categories are multi-label: a row counts for every category it carries. Categories are then matched
one-to-one to facets by the Hungarian method on the binned MI (:func:`match_categories`).
MI is reported in bits.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import mutual_info_score

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.polytope.model import BATCH_ROWS, SafetyPolytope, read_in_batches

logger = logging.getLogger(__name__)


def category_indicators(
    records: Sequence[Record], categories: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Multi-label category indicators ``[rows, C]`` (bool).

    Args:
        records: Row-aligned records.
        categories: Categories to report, in order; by default every category seen, sorted.
            A listed category that no row carries gets an all-false column.
    """
    cats = list(categories) if categories is not None else sorted({c for r in records for c in r.categories})
    col = {c: j for j, c in enumerate(cats)}
    out = np.zeros((len(records), len(cats)), dtype=bool)
    for i, r in enumerate(records):
        for c in r.categories:
            if c in col:
                out[i, col[c]] = True
    return cats, out


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin ids of ``values`` by (deduplicated) quantile edges; equal values share a bin."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI in bits between two discrete label arrays of equal length (0 for empty input).

    ``sklearn.metrics.mutual_info_score`` (natural log) converted to bits; labels may be of any
    type ``np.unique`` sorts (bool, int, float, str).
    """
    if len(a) == 0:
        return 0.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    return float(mutual_info_score(ia.ravel(), ib.ravel())) / math.log(2)


def mi_matrix(
    indicators: np.ndarray, margins: np.ndarray, *, mode: str = "binned", bins: int = 10
) -> np.ndarray:
    """MI ``[C, K]`` between category indicators ``[rows, C]`` and facet margins ``[rows, K]``.

    Args:
        mode: ``"binned"`` (quantile bins of the margin) or ``"fired"`` (margin > 0).
        bins: Number of quantile bins for ``"binned"``.
    """
    if mode not in ("binned", "fired"):
        raise SapError(f"unknown MI mode {mode!r}; expected binned or fired")
    if bins < 2:
        raise SapError("bins must be at least 2")
    cols = [quantile_bins(m, bins) if mode == "binned" else (m > 0) for m in margins.T]
    return np.array([[mutual_information(ind, col) for col in cols] for ind in indicators.T]).reshape(
        indicators.shape[1], margins.shape[1]
    )


def match_categories(mi: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (category, facet) pairs maximising total MI (Hungarian method).

    With more categories than facets, only ``K`` categories are matched (and vice versa).
    Returns pairs sorted by category index.
    """
    if mi.size == 0:
        return []
    rows, cols = linear_sum_assignment(mi, maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist()))


@dataclass
class Specialisation:
    """Result of :func:`analyse_specialisation`.

    Attributes:
        facet_names: Current facet names, ``K``.
        categories: Category names, ``C`` (empty when the data carries none).
        category_rows: Rows carrying each category (among the analysed rows).
        fired: Rows on which each facet fires (margin > 0), ``K``.
        mi_binned: ``[C, K]`` MI with quantile-binned margins (bits).
        mi_fired: ``[C, K]`` MI with fired / not fired (bits).
        matching: One dict per matched pair: category, facet, facet_name, mi_binned, mi_fired.
        chance_mi: 95th percentile of the binned MI with category labels shuffled across rows:
            matched MI near or below it is indistinguishable from chance on this many rows.
        rows: Number of rows analysed; ``unsafe_only`` says which.
        notes: Human-readable notes on skipped analyses and degenerate data.
    """

    facet_names: list[str]
    categories: list[str]
    category_rows: list[int]
    fired: list[int]
    mi_binned: np.ndarray
    mi_fired: np.ndarray
    matching: list[dict[str, Any]]
    chance_mi: float
    rows: int
    unsafe_only: bool
    notes: list[str] = field(default_factory=list)

    @property
    def has_categories(self) -> bool:
        return bool(self.categories)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (matrices as nested lists)."""
        return {
            "facet_names": self.facet_names,
            "categories": self.categories,
            "category_rows": self.category_rows,
            "fired": self.fired,
            "mi_binned": self.mi_binned.tolist(),
            "mi_fired": self.mi_fired.tolist(),
            "matching": self.matching,
            "chance_mi": self.chance_mi,
            "rows": self.rows,
            "unsafe_only": self.unsafe_only,
            "notes": self.notes,
        }


def chance_level(
    indicators: np.ndarray, margins: np.ndarray, bins: int, permutations: int, seed: int
) -> float:
    """95th percentile of the binned MI over category-label shuffles (0 when ``permutations`` is 0)."""
    if permutations < 1 or len(indicators) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    null = [
        mi_matrix(indicators[rng.permutation(len(indicators))], margins, bins=bins)
        for _ in range(permutations)
    ]
    return float(np.quantile(np.concatenate([n.ravel() for n in null]), 0.95))


def polytope_margins(poly: SafetyPolytope, x: torch.Tensor, batch: int = BATCH_ROWS) -> np.ndarray:
    """Per-facet margins ``[rows, K]`` of feature rows (positive: the facet fires)."""
    if len(x) == 0:
        return np.zeros((0, poly.num_facets), dtype=np.float32)
    return read_in_batches(poly, x.float(), batch_size=batch).numpy()


def analyse_specialisation(
    poly: SafetyPolytope,
    x: torch.Tensor,
    y: np.ndarray,
    records: Sequence[Record],
    *,
    unsafe_only: bool = True,
    bins: int = 10,
    categories: Sequence[str] | None = None,
    margins: np.ndarray | None = None,
    permutations: int = 5,
    seed: int = 0,
) -> Specialisation:
    """Facet x category MI (binned and fired) and the Hungarian matching.

    Args:
        poly: The polytope.
        x, y, records: Row-aligned features ``[rows, d]``, labels (1 = unsafe) and records,
            e.g. from :meth:`sapguard.features.store.FeatureSet.subset`.
        unsafe_only: Analyse unsafe rows only (default): MI then says which facet separates which
            kind of harm, rather than how well every facet separates unsafe from safe.
        bins: Quantile bins for the binned MI.
        categories: Categories to report (default: all seen); one without rows gets a note.
        margins: Precomputed ``poly`` margins of ``x`` (saves a pass).
        permutations: Label shuffles for the chance level of the MI (0 to skip).
        seed: Seed of the shuffles.

    Data without categories, categories without rows and facets that never fire give notes,
    not errors.
    """
    if not (len(x) == len(y) == len(records)):
        raise SapError(
            f"features ({len(x)}), labels ({len(y)}) and records ({len(records)}) are not row-aligned"
        )
    m = polytope_margins(poly, x) if margins is None else np.asarray(margins)
    if m.shape != (len(x), poly.num_facets):
        raise SapError(f"margins have shape {m.shape}, expected ({len(x)}, {poly.num_facets})")
    keep = np.asarray(y) == 1 if unsafe_only else np.ones(len(y), dtype=bool)
    m = m[keep]
    kept = [r for r, k in zip(records, keep) if k]
    names = poly.facet_names
    notes: list[str] = []
    if not kept:
        notes.append("no unsafe rows to analyse" if unsafe_only else "no rows to analyse")
    fired = (m > 0).sum(0).astype(int).tolist()
    silent = [names[k] for k, n in enumerate(fired) if n == 0]
    if silent and len(silent) == len(names):
        notes.append("no facet fires on these rows: the fired/not-fired MI is zero everywhere")
    elif silent:
        notes.append(f"{len(silent)} facet(s) never fire on these rows: {', '.join(silent)}")
    cats, ind = category_indicators(kept, categories)
    if not cats:
        notes.append(
            "the data carries no category labels: MI, the category-facet matching, the heatmap and "
            "category-derived facet names need them; per-facet views are still produced"
        )
    empty = [c for c, n in zip(cats, ind.sum(0)) if n == 0]
    if empty:
        notes.append(f"categories without rows (MI 0, not matched): {', '.join(empty)}")
    mi_b = mi_matrix(ind, m, mode="binned", bins=bins)
    mi_f = mi_matrix(ind, m, mode="fired")
    usable = [j for j, c in enumerate(cats) if c not in empty]
    pairs = [(usable[i], k) for i, k in match_categories(mi_b[usable])] if usable else []
    matching: list[dict[str, Any]] = [
        {
            "category": cats[c],
            "facet": k,
            "facet_name": names[k],
            "mi_binned": float(mi_b[c, k]),
            "mi_fired": float(mi_f[c, k]),
        }
        for c, k in pairs
    ]
    chance = chance_level(ind, m, bins, permutations, seed) if usable else 0.0
    weak = [p["category"] for p in matching if p["mi_binned"] <= chance]
    if weak:
        notes.append(f"matched MI at or below chance level ({chance:.3f} bits) for: {', '.join(weak)}")
    for note in notes:
        logger.warning(note)
    return Specialisation(
        facet_names=names,
        categories=cats,
        category_rows=ind.sum(0).astype(int).tolist(),
        fired=fired,
        mi_binned=mi_b,
        mi_fired=mi_f,
        matching=matching,
        chance_mi=chance,
        rows=int(keep.sum()),
        unsafe_only=unsafe_only,
        notes=notes,
    )


def suggested_names(spec: Specialisation, *, min_mi: float | None = None) -> list[str]:
    """One name per facet: its matched category, else its highest-MI category with a suffix.

    Only MI above ``min_mi`` (default: the analysis' chance level) names a facet; other facets,
    and all facets of data without categories, are ``facet_<k>``. Repeats of a category get
    ``_2``, ``_3``... in facet order, after the matched facet.
    """
    floor = spec.chance_mi if min_mi is None else min_mi
    matched = {p["facet"]: p["category"] for p in spec.matching if p["mi_binned"] > floor}
    seen: Counter[str] = Counter(matched.values())
    names = []
    for k in range(len(spec.facet_names)):
        if k in matched:
            names.append(matched[k])
        elif spec.categories and spec.mi_binned[:, k].max() > floor:
            best = spec.categories[int(np.argmax(spec.mi_binned[:, k]))]
            seen[best] += 1
            names.append(best if seen[best] == 1 else f"{best}_{seen[best]}")
        else:
            names.append(f"facet_{k}")
    return names


FACET_NAMING = "category x facet mutual information, Hungarian matching, train split"
"""How :func:`name_facets` names facets (recorded in the artifact as ``facet_naming``)."""


def name_facets(poly: SafetyPolytope, x: torch.Tensor, y: np.ndarray, records: Sequence[Record]) -> None:
    """Name each facet after the category it specialises in, and record per-facet statistics.

    The one naming scheme of sapguard: :func:`analyse_specialisation` on these rows (unsafe rows,
    category x facet MI, Hungarian matching, chance level of shuffled labels), then
    :func:`suggested_names`. Without category labels every facet is ``facet_<k>``.

    Writes ``facet_names``, ``facet_stats`` (per facet: unsafe rows it is the most violated facet
    of, rows it fires on, and the categories with the most MI, in bits) and, with categories,
    ``facet_naming`` into ``poly.meta``.
    """
    if not any(r.categories for r in records):
        poly.meta["facet_names"] = [f"facet_{k}" for k in range(poly.num_facets)]
        return
    spec = analyse_specialisation(poly, x, y, records)
    names = suggested_names(spec)
    unsafe = np.asarray(y) == 1
    most_violated = np.bincount(
        read_in_batches(poly, x[torch.as_tensor(unsafe)], margins=False).argmax(dim=1).numpy(),
        minlength=poly.num_facets,
    )
    stats = []
    for k, name in enumerate(names):
        top = np.argsort(-spec.mi_binned[:, k], kind="stable")[:5].tolist()
        stats.append(
            {
                "facet": k,
                "name": name,
                "unsafe_rows": int(most_violated[k]),
                "fired": spec.fired[k],
                "mi_bits": {spec.categories[c]: round(float(spec.mi_binned[c, k]), 4) for c in top},
            }
        )
    poly.meta["facet_names"] = names
    poly.meta["facet_stats"] = stats
    poly.meta["facet_naming"] = FACET_NAMING
