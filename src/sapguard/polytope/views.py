"""A polytope's scores over both views of prompts: the whole prompt and its tail (last line alone).

:mod:`sapguard.features.views` defines the tail view; this module reads it through a model and keeps
the larger score, which is how detection and the steering gate read a polytope whose config lists
``"views": ["prompt", "tail"]``. Used to calibrate such a polytope on validation rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sapguard.data.records import Record
from sapguard.features.extract import extract_features
from sapguard.features.views import TAIL_WORDS, tail_records
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.train import raw_scores


def max_view_scores(
    poly: SafetyPolytope,
    x: torch.Tensor,
    records: Sequence[Record],
    lm: LoadedModel,
    layer: int,
    template: str,
    words: int = TAIL_WORDS,
) -> np.ndarray:
    """Uncalibrated scores of ``records`` (prompt-view features ``x``), each the larger of its prompt
    and tail views; rows without a tail view keep their prompt score."""
    scores = raw_scores(poly, x.float())
    tails = tail_records(records, words)
    if tails:
        rows = sorted(tails)
        x_tail, index, _ = extract_features(lm, [tails[i] for i in rows], layer, policy="last_prompt", template=template)
        at = np.asarray(rows)[index.numpy()]
        scores[at] = np.maximum(scores[at], raw_scores(poly, x_tail))
    return scores
