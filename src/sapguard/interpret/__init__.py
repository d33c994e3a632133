"""What each facet learned: specialisation (MI and matching), per-facet views, word attribution, report.

The specialisation analysis itself lives in :mod:`sapguard.polytope.specialisation` (training names
facets with it); it is re-exported here.

Example:
    >>> from sapguard.interpret import analyse_specialisation  # doctest: +SKIP
    >>> spec = analyse_specialisation(poly, x_test, y_test, records_test)  # doctest: +SKIP
    >>> spec.matching[0]  # doctest: +SKIP
    {'category': 'cybercrime', 'facet': 3, 'facet_name': 'cybercrime', 'mi_binned': 0.21, 'mi_fired': 0.12}
"""

from sapguard.interpret.attribution import WordScore, highlight_html, word_attribution
from sapguard.interpret.naming import apply_facet_names
from sapguard.interpret.report import build_report
from sapguard.interpret.views import FacetViews, facet_views
from sapguard.polytope.specialisation import (
    Specialisation,
    analyse_specialisation,
    match_categories,
    mi_matrix,
    suggested_names,
)

__all__ = [
    "FacetViews",
    "Specialisation",
    "WordScore",
    "analyse_specialisation",
    "apply_facet_names",
    "build_report",
    "facet_views",
    "highlight_html",
    "match_categories",
    "mi_matrix",
    "suggested_names",
    "word_attribution",
]
