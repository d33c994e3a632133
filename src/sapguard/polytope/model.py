"""The safety polytope: a concept encoder, K facets and thresholds over one layer's hidden states.

    f = E(h)              concept encoder: standardise, then Linear -> ReLU (``depth`` times) or identity
    v = phi @ f - xi      per-facet violation; the state is safe iff every v_k <= 0

A decision offset calibrated on validation data shifts the verdict: a text is flagged unsafe when
``max_k v_k > offset``. Margins reported to users are ``v_k - offset``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sapguard.errors import SapError


@dataclass(frozen=True)
class EncoderSpec:
    """Shape of the concept encoder.

    Attributes:
        kind: ``"mlp"`` (Linear -> ReLU, repeated ``depth`` times; the paper's is depth 1) or
            ``"identity"`` (facets act on the standardised hidden state directly).
        width: Concept dimension F (paper: 16384).
        depth: Number of Linear -> ReLU layers.
    """

    kind: str = "mlp"
    width: int = 4096
    depth: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "identity"):
            raise SapError(f"unknown encoder kind {self.kind!r}; expected mlp or identity")
        if self.kind == "mlp" and (self.width < 1 or self.depth < 1):
            raise SapError("encoder width and depth must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConceptEncoder(nn.Module):
    """Standardise ``h`` with training statistics, then map it to concept features ``f``."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden_size: int, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        layers: list[nn.Module] = []
        width = hidden_size
        if spec.kind == "mlp":
            for _ in range(spec.depth):
                layers += [nn.Linear(width, spec.width), nn.ReLU()]
                width = spec.width
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., F]``."""
        return self.net((h - self.mean) / self.scale)


class SafetyPolytope(nn.Module):
    """``Q = {f : phi_k . f <= xi_k for every facet k}`` over a concept encoding of hidden states.

    Args:
        hidden_size: Width d of the base model's hidden states.
        num_facets: Number of facets K.
        encoder: Concept encoder spec.
        meta: Everything an artifact records besides weights (base model, layer, token policy,
            template, facet names, calibration, training summary...). See
            :mod:`sapguard.polytope.artifact`.

    Example:
        >>> poly = SafetyPolytope(576, 8, EncoderSpec(width=256))
        >>> poly(torch.zeros(2, 576)).shape
        torch.Size([2, 8])
    """

    offset: torch.Tensor

    def __init__(self, hidden_size: int, num_facets: int, encoder: EncoderSpec, meta: dict[str, Any] | None = None):
        super().__init__()
        if num_facets < 1:
            raise SapError("num_facets must be at least 1")
        self.hidden_size = hidden_size
        self.num_facets = num_facets
        self.encoder = ConceptEncoder(hidden_size, encoder)
        self.phi = nn.Parameter(torch.randn(num_facets, self.encoder.out_features) / self.encoder.out_features**0.5)
        self.xi = nn.Parameter(torch.zeros(num_facets))
        self.register_buffer("offset", torch.zeros(()))
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def facet_names(self) -> list[str]:
        names = self.meta.get("facet_names")
        return list(names) if names else [f"facet_{k}" for k in range(self.num_facets)]

    def concepts(self, h: torch.Tensor) -> torch.Tensor:
        """Concept features ``f = E(h)``, ``[..., F]``."""
        return self.encoder(h.to(self.phi.dtype))

    def violations_from_concepts(self, f: torch.Tensor) -> torch.Tensor:
        """``v = phi f - xi``, ``[..., K]``."""
        return f @ self.phi.T - self.xi

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Per-facet violations ``v`` of hidden states ``h`` (``[..., d] -> [..., K]``)."""
        return self.violations_from_concepts(self.concepts(h))

    def margins(self, h: torch.Tensor) -> torch.Tensor:
        """Violations minus the calibrated offset: positive means the facet fires."""
        return self(h) - self.offset

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Unsafety score: the largest margin, ``[...]``. Positive means unsafe."""
        return self.margins(h).max(dim=-1).values

    # Detection (``sapguard.detect.scan(poly, texts)``) and steering
    # (``sapguard.steer.steer(model, poly, mode)``) live in the layers above, which own them.
    # save_pretrained/from_pretrained import polytope.artifact lazily because artifact imports this
    # module at load time.
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the artifact directory; see :func:`sapguard.polytope.artifact.save_polytope`."""
        from sapguard.polytope.artifact import save_polytope

        save_polytope(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SafetyPolytope:
        """Load an artifact directory; see :func:`sapguard.polytope.artifact.load_polytope`."""
        from sapguard.polytope.artifact import load_polytope

        return load_polytope(directory)


BATCH_ROWS = 4096
"""Feature rows read in one pass by :func:`read_in_batches`."""


@torch.no_grad()
def read_in_batches(
    poly: SafetyPolytope, x: torch.Tensor, *, margins: bool = True, batch_size: int = BATCH_ROWS
) -> torch.Tensor:
    """Per-facet margins (or, with ``margins=False``, raw violations) of feature rows, batch by batch.

    The one loop that reads many feature rows through a polytope (training, calibration, facet
    analysis, detection): no gradients, each batch moved to the polytope's device, the result on
    the CPU.

    Args:
        poly: The polytope.
        x: Feature rows ``[n, d]``.
        margins: Subtract the calibrated offset (``v_k - offset``, positive fires) or not (``v_k``).
        batch_size: Rows per pass.

    Returns:
        ``[n, K]`` float tensor on the CPU.

    Example:
        >>> poly = SafetyPolytope(4, 2, EncoderSpec("identity"))
        >>> read_in_batches(poly, torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """
    device = poly.phi.device
    read = poly.margins if margins else poly
    out = [read(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, poly.num_facets), dtype=poly.phi.dtype)
