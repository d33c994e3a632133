"""sapguard: learn safety constraints inside a language model (Safety Polytope, ICML 2025).

Detect unsafe requests and say which constraint (facet) they break, steer generation back into the
safe region, and inspect what each facet learned.
"""

from __future__ import annotations

import logging

from sapguard._version import __version__
from sapguard.data.records import Record
from sapguard.detect import Verdict, scan
from sapguard.models.loading import LoadedModel, load_model
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.polytope.train import TrainConfig, train_polytope

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
