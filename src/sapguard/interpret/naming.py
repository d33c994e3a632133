"""Facet names from the specialisation analysis, and writing names into a polytope artifact.

Names live in the artifact's ``config.json`` under ``facet_names`` (one per facet); detection
verdicts, steering traces and reports read them from there. Users may edit that list by hand
(keep one unique name per facet) or write the analysis-derived names with
:func:`apply_facet_names` / ``sap interpret --rename``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sapguard.errors import SapError
from sapguard.interpret.specialisation import Specialisation
from sapguard.polytope.artifact import load_polytope, save_polytope

logger = logging.getLogger(__name__)


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


def check_names(names: Sequence[str], num_facets: int, where: str) -> list[str]:
    """Validate a facet name list: one non-empty, unique string per facet."""
    names = [str(n).strip() for n in names]
    if len(names) != num_facets:
        raise SapError(f"{where}: {len(names)} facet names given for {num_facets} facets")
    if any(not n for n in names):
        raise SapError(f"{where}: facet names must be non-empty")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise SapError(f"{where}: duplicate facet names {', '.join(dup)}")
    return names


def apply_facet_names(directory: str | Path, names: Sequence[str]) -> list[str]:
    """Write ``names`` into a polytope artifact's config (the artifact is re-saved atomically).

    Returns:
        The previous names.
    """
    poly = load_polytope(directory)
    names = check_names(names, poly.num_facets, str(directory))
    old = poly.facet_names
    poly.meta["facet_names"] = names
    save_polytope(poly, directory)
    logger.info("renamed facets of %s", directory)
    return old
