"""Writing facet names into a polytope artifact (the names come from :func:`sapguard.polytope.specialisation.suggested_names`).

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

from sapguard.errors import SapError
from sapguard.io import atomic_write, write_json
from sapguard.polytope.artifact import CARD, CONFIG, load_polytope, model_card, read_config

logger = logging.getLogger(__name__)


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
    """Write ``names`` into a polytope artifact's ``config.json`` and card (each atomically).

    Only those two files change: the weights (and their recorded checksum) and whatever else the
    directory holds (a steering artifact's direction and ``target/``) stay as they are.

    Returns:
        The previous names.
    """
    poly = load_polytope(directory)
    names = check_names(names, poly.num_facets, str(directory))
    old = poly.facet_names
    config = read_config(directory)
    config["facet_names"] = names
    write_json(Path(directory) / CONFIG, config)
    with atomic_write(Path(directory) / CARD) as fh:
        fh.write(model_card(config))
    logger.info("renamed facets of %s", directory)
    return old
