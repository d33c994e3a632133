"""Steering modes: small strategy objects that turn violating hidden states into edited ones.

Every mode implements :class:`SteeringMode`: ``edit(h, poly) -> Edit`` receives only the rows
that violate the polytope (float32, on the activation's device) and returns their replacements.
Rows that do not violate never reach a mode, so they are never touched.

- :class:`SafeFlow`: the paper's Algorithm 1 as a minimal-edit solver (proximal steps until every
  facet of its target holds).
- :class:`Redirect`: add a learned direction (refusal mean minus compliance mean), gated by the
  polytope, in the spirit of conditional activation steering.
- :class:`Detect`: no edit, only the trace. ``refuse`` is :class:`Detect` in the hook plus a fixed
  refusal chosen by :func:`sapguard.steer.generate.generate`.
- :class:`AddDirection`: ungated activation addition (the refusal-direction baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.solver import polytope_on, solve, solve_static

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
    """Algorithm 1 as a minimal-edit solver (:func:`sapguard.steer.solver.solve`).

    Minimises ``||h'-h||_1/d + lambda_safe*sum v + lambda_unsafe*sum relu(v+margin)`` by proximal
    steps with a closed-form gradient (no autograd for the paper's one-layer encoder). Each row
    stops as soon as every facet holds with ``margin`` (``max_k v_k <= -margin``) or after
    ``max_steps``; the final iterate is returned.

    Attributes:
        margin: Target margin inside the polytope.
        lambda_safe: Weight of ``sum v`` (pushes deeper inside; the paper's Qwen2 uses 5000).
        lambda_unsafe: Weight of the hinge; larger means a weaker l1 shrink per step.
        max_steps: Step budget per edited state.
        overshoot: Multiplier of the Polyak step size.
        target: The polytope whose constraints are solved (``None``: the gate itself, as in the
            paper). A behavioural target (refusal vs compliance states) is stored in the artifact's
            ``target/`` directory; see :mod:`sapguard.steer.target`.
        basis: Optional ``[r, d]`` orthonormal rows restricting the edit to their span
            (:func:`make_mode` accepts ``"refusal_direction"``: the artifact's direction, normalised).
        nonnegative: With a basis, edit only *along* its vectors (coordinates ``>= 0``);
            :func:`make_mode` turns it on for ``"refusal_direction"`` (toward refusal, never away).
        static: Use :func:`~sapguard.steer.solver.solve_static` (same iterates, fixed shapes, no
            host synchronisation, always ``max_steps`` iterations): the form a CUDA graph can capture.
    """

    margin: float = 1.0
    lambda_safe: float = 0.0
    lambda_unsafe: float = 10.0
    max_steps: int = 50
    overshoot: float = 1.2
    target: SafetyPolytope | None = None
    basis: torch.Tensor | None = None
    nonnegative: bool = False
    static: bool = False
    name: str = "safeflow"
    edits: bool = True
    gated: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise SapError("max_steps must be at least 1")
        if self.overshoot <= 0:
            raise SapError("overshoot must be positive")
        self._on_device: dict[torch.device, tuple[SafetyPolytope, torch.Tensor | None]] = {}

    def constraints(
        self, poly: SafetyPolytope, device: torch.device
    ) -> tuple[SafetyPolytope, torch.Tensor | None]:
        """The solved polytope (target or ``poly``) and the basis, float32 on ``device``."""
        if self.target is None:
            basis = None if self.basis is None else self.basis.to(device, torch.float32)
            return poly, basis
        if device not in self._on_device:
            basis = None if self.basis is None else self.basis.to(device, torch.float32)
            self._on_device[device] = (polytope_on(self.target, device), basis)
        return self._on_device[device]

    def edit(self, h: torch.Tensor, poly: SafetyPolytope) -> Edit:
        target, basis = self.constraints(poly, h.device)
        with torch.inference_mode():
            res = (solve_static if self.static else solve)(
                target,
                h,
                margin=self.margin,
                lambda_safe=self.lambda_safe,
                lambda_unsafe=self.lambda_unsafe,
                max_steps=self.max_steps,
                overshoot=self.overshoot,
                basis=basis,
                nonnegative=self.nonnegative,
            )
        if not self.static and bool(res.failed.any()):  # the static form never synchronises
            logger.warning(
                "SafeFlow produced non-finite values for %d state(s); falling back", int(res.failed.sum())
            )
        return Edit(res.hidden, res.steps, res.failed)


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
    """The redirect direction in the polytope's meta (``meta["steering"]["direction"]``), float32.

    :func:`sapguard.steer.artifact.load_steering` puts it there from the artifact's
    ``steering.safetensors`` (or from the JSON list of an older artifact's config).
    """
    steering = poly.meta.get("steering") or {}
    if "direction" not in steering:
        if "direction_tensor" in steering:
            raise SapError(
                "this polytope's steering direction is in its steering.safetensors; load the artifact "
                "with sapguard.steer.artifact.load_steering"
            )
        raise SapError(
            "this polytope has no steering direction; train it with `sap steer-train` or use safeflow"
        )
    direction = steering["direction"]
    if isinstance(direction, torch.Tensor):
        return direction.detach().to("cpu", torch.float32).clone()
    return torch.tensor(direction, dtype=torch.float32)


def make_mode(name: str, poly: SafetyPolytope, **options: Any) -> SteeringMode:
    """Build a mode by name with defaults taken from ``poly.meta["steering"]`` when present.

    SafeFlow's target defaults to the behavioural target attached to ``poly`` by
    :func:`sapguard.steer.artifact.load_steering` (else the gate itself).

    Args:
        name: One of :data:`MODES`.
        poly: The polytope (for stored defaults, the target and the redirect direction).
        **options: Overrides (``margin``, ``max_steps``, ``alpha``, ``target``...); ``None`` values ignored.
    """
    from sapguard.steer.artifact import target_of

    stored = dict((poly.meta.get("steering") or {}).get("defaults", {}).get(name, {}))
    stored.update({k: v for k, v in options.items() if v is not None})
    if name == "safeflow":
        stored.setdefault("target", target_of(poly))
        if stored.get("basis") == "refusal_direction":
            u = steering_direction(poly)
            stored["basis"] = (u / u.norm())[None, :]
            stored.setdefault("nonnegative", True)
        return SafeFlow(**_known(SafeFlow, stored))
    if name == "redirect":
        return Redirect(direction=steering_direction(poly), **_known(Redirect, stored))
    if name in ("refuse", "detect"):
        return Detect()
    raise SapError(f"unknown steering mode {name!r}; expected one of {', '.join(MODES)}")


def _known(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """Options ``cls`` accepts; stale keys of older artifacts (e.g. ``lr``) are dropped with a log line."""
    names = {f.name for f in fields(cls)} - {"name", "edits", "gated", "direction"}
    dropped = sorted(set(options) - names)
    if dropped:
        logger.info("ignoring %s option(s) %s", cls.__name__, ", ".join(dropped))
    return {k: v for k, v in options.items() if k in names}
