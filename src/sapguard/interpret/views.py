"""Per-facet views: top texts, margins by label, facet similarity, usage and a 2-D projection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope
from sapguard.polytope.specialisation import polytope_margins


@dataclass
class FacetViews:
    """Everything the per-facet figures and cards show.

    Attributes:
        facet_names: ``K`` names.
        margins: ``[rows, K]`` margins (positive: fires).
        labels: ``[rows]`` 1 = unsafe.
        top_texts: Per facet, the ``top_k`` rows with the largest margin: dicts with text,
            margin, is_safe, categories (texts come from each row's own record).
        similarity: ``[K, K]`` cosine similarity of the facet normals ``phi``.
        fired: ``[K]`` rows on which each facet fires.
        first: ``[K]`` flagged rows on which each facet is the most violated one.
        firing: ``[rows]`` index of the most violated facet where the text is flagged, else -1.
        projection: ``[rows, 2]`` PCA of the features; ``explained`` its variance ratios.
    """

    facet_names: list[str]
    margins: np.ndarray
    labels: np.ndarray
    top_texts: list[list[dict[str, Any]]]
    similarity: np.ndarray
    fired: np.ndarray
    first: np.ndarray
    firing: np.ndarray
    projection: np.ndarray
    explained: list[float]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no per-row arrays)."""
        return {
            "facet_names": self.facet_names,
            "top_texts": [
                {"facet": k, "name": n, "texts": t}
                for k, (n, t) in enumerate(zip(self.facet_names, self.top_texts))
            ],
            "similarity": self.similarity.tolist(),
            "fired": self.fired.tolist(),
            "first": self.first.tolist(),
            "pca_explained_variance": self.explained,
        }


def record_text(record: Record) -> str:
    """The prompt, and the response after a separator when there is one."""
    return (
        record.prompt if record.response is None else f"{record.prompt}\n--- response ---\n{record.response}"
    )


def top_texts(margins: np.ndarray, records: Sequence[Record], k: int = 5) -> list[list[dict[str, Any]]]:
    """Per facet, the ``k`` rows with the largest margin, most violating first."""
    out = []
    for col in margins.T:
        order = np.argsort(-col, kind="stable")[:k]
        out.append(
            [
                {
                    "text": record_text(records[i]),
                    "margin": float(col[i]),
                    "is_safe": records[i].is_safe,
                    "categories": list(records[i].categories),
                }
                for i in order
            ]
        )
    return out


def facet_similarity(poly: SafetyPolytope) -> np.ndarray:
    """Cosine similarity ``[K, K]`` of the facet normals (rows of ``phi``)."""
    phi = poly.phi.detach().float()
    unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim: np.ndarray = (unit @ unit.T).cpu().numpy()
    return sim


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """PCA of feature rows to two dimensions (zero-padded when fewer are available)."""
    n_comp = min(2, x.shape[0], x.shape[1])
    out = np.zeros((x.shape[0], 2), dtype=np.float32)
    if n_comp == 0:
        return out, [0.0, 0.0]
    pca = PCA(n_components=n_comp, random_state=seed)
    out[:, :n_comp] = pca.fit_transform(x)
    explained = [float(v) for v in pca.explained_variance_ratio_] + [0.0] * (2 - n_comp)
    return out, explained


def facet_views(
    poly: SafetyPolytope,
    x: torch.Tensor,
    y: np.ndarray,
    records: Sequence[Record],
    *,
    k: int = 5,
    margins: np.ndarray | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> FacetViews:
    """Compute the per-facet views of ``poly`` on row-aligned ``x``, ``y``, ``records``.

    Args:
        k: Texts per facet.
        margins: Precomputed margins of ``x`` (saves a pass).
        max_points: Rows kept (uniformly at random) for the PCA projection.
    """
    if not (len(x) == len(y) == len(records)):
        raise SapError(
            f"features ({len(x)}), labels ({len(y)}) and records ({len(records)}) are not row-aligned"
        )
    if len(x) == 0:
        raise SapError("no rows to analyse")
    m = polytope_margins(poly, x) if margins is None else np.asarray(margins)
    fired_mask = m > 0
    flagged = fired_mask.any(1)
    firing = np.where(flagged, m.argmax(1), -1)
    keep = np.arange(len(x))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
    projection, explained = project_2d(x[keep].float().numpy(), seed)
    return FacetViews(
        facet_names=poly.facet_names,
        margins=m,
        labels=np.asarray(y),
        top_texts=top_texts(m, records, k),
        similarity=facet_similarity(poly),
        fired=fired_mask.sum(0),
        first=np.bincount(firing[flagged], minlength=poly.num_facets),
        firing=firing[keep],
        projection=projection,
        explained=explained,
    )
