"""sapguard: learn safety constraints inside a language model (Safety Polytope, ICML 2025).

Detect unsafe requests and say which constraint (facet) they break, steer generation back into the
safe region, and inspect what each facet learned.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from sapguard.data.records import Record  # noqa: E402
from sapguard.detect import Verdict, scan  # noqa: E402
from sapguard.models.loading import LoadedModel, load_model  # noqa: E402
from sapguard.polytope.model import EncoderSpec, SafetyPolytope  # noqa: E402
from sapguard.polytope.train import TrainConfig, train_polytope  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "EncoderSpec",
    "LoadedModel",
    "Record",
    "SafetyPolytope",
    "TrainConfig",
    "Verdict",
    "__version__",
    "load_model",
    "scan",
    "train_polytope",
]
