"""Steering modes: small strategy objects that turn violating hidden states into edited ones.

Every mode implements :class:`SteeringMode`: ``edit(h, poly) -> Edit`` receives only the rows
that violate the polytope (float32, on the activation's device) and returns their replacements.
Rows that do not violate never reach a mode, so they are never touched.

- :class:`SafeFlow`: the paper's Algorithm 1, done properly (iterate until every facet holds).
- :class:`Redirect`: add a learned direction (refusal mean minus compliance mean), gated by the
  polytope, in the spirit of conditional activation steering.
- :class:`Detect`: no edit, only the trace. ``refuse`` is :class:`Detect` in the hook plus a fixed
  refusal chosen by :func:`sapguard.steer.generate.generate`.
- :class:`AddDirection`: ungated activation addition (the refusal-direction baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope

logger = logging.getLogger(__name__)

MODES = ("safeflow", "redirect", "refuse", "detect")


@dataclass
class Edit:
    """The result of editing ``n`` violating rows.

    Attributes:
        hidden: ``[n, d]`` float32 replacement states.
        steps: ``[n]`` optimisation steps used (0 for one-shot modes).
        failed: ``[n]`` True where the optimisation produced non-finite values; those rows keep
            the last finite iterate and the caller must not report them as steered.
    """

    hidden: torch.Tensor
    steps: torch.Tensor
    failed: torch.Tensor


class SteeringMode(Protocol):
    """One way to edit violating states."""

    name: str
    edits: bool
    gated: bool

    def edit(self, h: torch.Tensor, poly: SafetyPolytope) -> Edit:
        """Replacement states for violating rows ``h`` ``[n, d]`` (float32)."""
        ...


def _unchanged(h: torch.Tensor) -> Edit:
    zeros = torch.zeros(len(h), dtype=torch.long, device=h.device)
    return Edit(h, zeros, torch.zeros(len(h), dtype=torch.bool, device=h.device))


@dataclass
class Detect:
    """Trace only; never edits."""

    name: str = "detect"
    edits: bool = False
    gated: bool = True

    def edit(self, h: torch.Tensor, poly: SafetyPolytope) -> Edit:
        return _unchanged(h)


@dataclass
class SafeFlow:
    """Algorithm 1: minimise ``||h'-h||_1/d + lambda_safe*sum v + lambda_unsafe*sum relu(v+margin)``.

    ``v`` are the polytope's calibrated margins (positive = facet fires). Each row stops as soon as
    every facet holds with ``margin`` (``max_k v_k <= -margin``) or after ``max_steps``.

    Attributes:
        margin: Target margin inside the polytope.
        lambda_safe: Weight of ``sum v`` (pushes deeper inside; the paper's Qwen2 uses 5000).
        lambda_unsafe: Weight of the hinge on violated facets.
        lr: Step size (in units of the hidden state).
        max_steps: Step budget per edited state.
        optimizer: ``"adam"`` or ``"sgd"``.
    """

    margin: float = 1.0
    lambda_safe: float = 0.0
    lambda_unsafe: float = 10.0
    lr: float = 0.1
    max_steps: int = 50
    optimizer: str = "adam"
    name: str = "safeflow"
    edits: bool = True
    gated: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise SapError(f"unknown optimizer {self.optimizer!r}; expected adam or sgd")
        if self.max_steps < 1:
            raise SapError("max_steps must be at least 1")

    def edit(self, h: torch.Tensor, poly: SafetyPolytope) -> Edit:
        x = h.detach().clone().requires_grad_(True)
        opt_cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        opt = opt_cls([x], lr=self.lr)
        steps = torch.zeros(len(h), dtype=torch.long, device=h.device)
        active = torch.ones(len(h), dtype=torch.bool, device=h.device)
        failed = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        best = h.detach().clone()
        d = h.shape[-1]
        with torch.enable_grad():
            for _ in range(self.max_steps):
                v = poly.margins(x)
                finite = torch.isfinite(v).all(-1) & torch.isfinite(x).all(-1)
                failed |= active & ~finite
                active &= finite
                best[active] = x.detach()[active]
                active &= v.detach().max(-1).values > -self.margin
                if not bool(active.any()):
                    break
                loss_rows = (
                    (x - h).abs().sum(-1) / d
                    + self.lambda_safe * v.sum(-1)
                    + self.lambda_unsafe * torch.relu(v + self.margin).sum(-1)
                )
                (grad,) = torch.autograd.grad(loss_rows[active].sum(), x)
                grad = torch.nan_to_num(grad, nan=0.0) * active[:, None]
                opt.zero_grad()
                x.grad = grad
                opt.step()
                steps += active.long()
        if bool(failed.any()):
            logger.warning(
                "SafeFlow produced non-finite values for %d state(s); falling back", int(failed.sum())
            )
        return Edit(best, steps, failed)


@dataclass
class Redirect:
    """``h' = h + alpha * direction``, applied only where the polytope fires.

    Attributes:
        direction: ``[d]`` steering direction (refusal mean minus compliance mean at the layer).
        alpha: Scale of the addition.
    """

    direction: torch.Tensor
    alpha: float = 1.0
    name: str = "redirect"
    edits: bool = True
    gated: bool = True

    def edit(self, h: torch.Tensor, poly: SafetyPolytope) -> Edit:
        u = self.direction.to(h.device, torch.float32)
        return Edit(
            h + self.alpha * u,
            torch.zeros(len(h), dtype=torch.long, device=h.device),
            torch.zeros(len(h), dtype=torch.bool, device=h.device),
        )


@dataclass
class AddDirection(Redirect):
    """Ungated activation addition (Arditi et al. 2024 style); every selected position is edited."""

    name: str = "add_direction"
    gated: bool = False


def steering_direction(poly: SafetyPolytope) -> torch.Tensor:
    """The redirect direction stored in the polytope's meta (``meta["steering"]["direction"]``)."""
    steering = poly.meta.get("steering") or {}
    if "direction" not in steering:
        raise SapError(
            "this polytope has no steering direction; train it with `sap steer-train` or use safeflow"
        )
    return torch.tensor(steering["direction"], dtype=torch.float32)


def make_mode(name: str, poly: SafetyPolytope, **options: Any) -> SteeringMode:
    """Build a mode by name with defaults taken from ``poly.meta["steering"]`` when present.

    Args:
        name: One of :data:`MODES`.
        poly: The polytope (for stored defaults and the redirect direction).
        **options: Overrides (``margin``, ``max_steps``, ``lr``, ``alpha``...); ``None`` values ignored.
    """
    stored = dict((poly.meta.get("steering") or {}).get("defaults", {}).get(name, {}))
    stored.update({k: v for k, v in options.items() if v is not None})
    if name == "safeflow":
        return SafeFlow(**stored)
    if name == "redirect":
        return Redirect(direction=steering_direction(poly), **stored)
    if name in ("refuse", "detect"):
        return Detect()
    raise SapError(f"unknown steering mode {name!r}; expected one of {', '.join(MODES)}")
