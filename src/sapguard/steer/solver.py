"""SafeFlow's minimal-edit solver: proximal (sub)gradient steps on the paper's objective.

For violating states ``h`` (rows) it approximately solves

    min_x  ||x - h||_1 / d  +  lambda_safe * sum_k v_k(x)  +  lambda_unsafe * sum_k relu(v_k(x) + margin)

where ``v(x)`` are the polytope's calibrated margins. The smooth-ish part
``g(x) = lambda_safe * sum v + lambda_unsafe * sum relu(v + margin)`` is piecewise linear for the
paper's encoder ``f = relu(W (x - mean) / scale + b)``, and its gradient is closed form:

    dg/dx = W^T ((pre > 0) * (phi^T c)) / scale,   c_k = lambda_safe + lambda_unsafe * [v_k + margin > 0]

so no autograd graph is needed and the step runs under ``torch.inference_mode`` (and inside
serving engines). Deeper encoders fall back to autograd.

One iteration (ISTA with a Polyak step size):

    eta   = overshoot * g_hinge(x) / ||dg/dx||^2              (the step that zeroes the linearised hinge)
    x     = h + soft(x - eta * dg/dx - h, eta / d)             (prox of the l1 term, weight 1/d)

and, with a ``basis`` (``[r, d]``, orthonormal rows), the same step runs on the edit's
coordinates in that basis (projected gradient, Polyak step on its norm) with the prox threshold
``eta * ||u_i||_1 / d`` per basis vector (exact for one vector, a separable bound for several);
``nonnegative=True`` also projects the coordinates onto ``>= 0`` (the edit may only move *along*
the basis vectors, e.g. toward refusal, never against them; a row whose constraints cannot be
met that way keeps its best allowed iterate and reports its margin). The
stopping rule is explicit: a row stops as soon as every facet holds with the margin
(``max_k v_k <= -margin``) or when ``max_steps`` is spent. The returned state is the *final
iterate*, evaluated after its step (one step of budget returns one step's edit, never the input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope


@dataclass
class SolveResult:
    """Final iterates of a batch of rows.

    Attributes:
        hidden: ``[n, d]`` final iterates.
        steps: ``[n]`` steps taken.
        margin: ``[n]`` max facet margin of the final iterate.
        failed: ``[n]`` non-finite values appeared (those rows keep their last finite iterate).
    """

    hidden: torch.Tensor
    steps: torch.Tensor
    margin: torch.Tensor
    failed: torch.Tensor


def closed_form_ok(poly: SafetyPolytope) -> bool:
    """True when the encoder is identity or one Linear -> ReLU (closed-form gradient)."""
    spec = poly.encoder.spec
    return spec.kind == "identity" or (spec.kind == "mlp" and spec.depth == 1)


def margins_and_grad(
    poly: SafetyPolytope, x: torch.Tensor, margin: float, lambda_safe: float, lambda_unsafe: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins ``v`` ``[n, K]`` and the gradient of ``g`` w.r.t. ``x`` ``[n, d]``, without autograd."""
    enc = poly.encoder
    z = (x - enc.mean) / enc.scale
    phi = poly.phi
    if enc.spec.kind == "identity":
        v = z @ phi.T - poly.xi - poly.offset
        c = lambda_safe + lambda_unsafe * (v + margin > 0).to(x.dtype)
        return v, (c @ phi) / enc.scale
    linear = enc.net[0]
    assert isinstance(linear, torch.nn.Linear)
    pre = z @ linear.weight.T + linear.bias
    f = torch.relu(pre)
    v = f @ phi.T - poly.xi - poly.offset
    c = lambda_safe + lambda_unsafe * (v + margin > 0).to(x.dtype)
    grad_f = (c @ phi) * (pre > 0).to(x.dtype)
    return v, (grad_f @ linear.weight) / enc.scale


def autograd_margins_and_grad(
    poly: SafetyPolytope, x: torch.Tensor, margin: float, lambda_safe: float, lambda_unsafe: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`margins_and_grad` by autograd (any encoder depth)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        v = poly.margins(xg)
        g = lambda_safe * v.sum() + lambda_unsafe * torch.relu(v + margin).sum()
        (grad,) = torch.autograd.grad(g, xg)
    return v.detach(), grad.detach()


def soft_threshold(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sign(x) * max(|x| - t, 0)`` (``t`` broadcasts)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


def _ista_step(
    x: torch.Tensor,
    h: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    margin: float,
    lambda_unsafe: float,
    overshoot: float,
    basis: torch.Tensor | None,
    l1_weight: torch.Tensor | None,
    nonnegative: bool,
) -> torch.Tensor:
    """One proximal step for rows ``x`` (edited from ``h``) with margins ``v`` and gradient ``grad``."""
    hinge = torch.relu(v + margin).sum(-1) * (lambda_unsafe if lambda_unsafe > 0 else 1.0)
    if basis is None:
        eta = overshoot * hinge / grad.pow(2).sum(-1).clamp_min(1e-12)  # [m]
        return h + soft_threshold(x - eta[:, None] * grad - h, eta[:, None] / x.shape[-1])
    gc = grad @ basis.T  # gradient in basis coordinates, [m, r]
    eta = overshoot * hinge / gc.pow(2).sum(-1).clamp_min(1e-12)
    coef = (x - h) @ basis.T - eta[:, None] * gc
    assert l1_weight is not None
    coef = soft_threshold(coef, eta[:, None] * l1_weight[None, :])
    if nonnegative:
        coef = coef.clamp_min(0.0)
    return h + coef @ basis


def solve(
    poly: SafetyPolytope,
    h: torch.Tensor,
    *,
    margin: float = 1.0,
    lambda_safe: float = 0.0,
    lambda_unsafe: float = 10.0,
    max_steps: int = 50,
    overshoot: float = 1.2,
    basis: torch.Tensor | None = None,
    nonnegative: bool = False,
) -> SolveResult:
    """Move rows ``h`` ``[n, d]`` (float32) into the polytope with a small l1 edit (see module doc).

    Args:
        poly: The polytope whose constraints must hold (float32, on ``h``'s device).
        h: States to edit.
        margin: Target depth inside every facet.
        lambda_safe, lambda_unsafe: Weights of ``sum v`` and of the hinge (the paper's lambdas).
        max_steps: Step budget per row (at least 1).
        overshoot: Multiplier of the Polyak step (> 1 reaches the margin despite the l1 shrink).
        basis: Optional ``[r, d]`` orthonormal rows: the edit stays in their span.
        nonnegative: With ``basis``, the edit's coordinates stay ``>= 0`` (a cone, not a span).
    """
    grad_fn = margins_and_grad if closed_form_ok(poly) else autograd_margins_and_grad
    d = h.shape[-1]
    x = h.clone()
    n = len(h)
    steps = torch.zeros(n, dtype=torch.long, device=h.device)
    failed = torch.zeros(n, dtype=torch.bool, device=h.device)
    l1_weight = None if basis is None else basis.abs().sum(-1) / d  # [r]
    v, grad = grad_fn(poly, x, margin, lambda_safe, lambda_unsafe)
    failed |= ~torch.isfinite(v).all(-1) | ~torch.isfinite(grad).all(-1)
    active = (v.max(-1).values > -margin) & ~failed
    for _ in range(max(int(max_steps), 1)):
        if not bool(active.any()):
            break
        idx = active.nonzero(as_tuple=True)[0]
        new = _ista_step(x[idx], h[idx], v[idx], grad[idx], margin, lambda_unsafe, overshoot, basis, l1_weight, nonnegative)
        finite = torch.isfinite(new).all(-1)
        failed[idx[~finite]] = True
        active[idx[~finite]] = False
        ok = idx[finite]
        x[ok] = new[finite]
        steps[ok] += 1
        v_ok, g_ok = grad_fn(poly, x[ok], margin, lambda_safe, lambda_unsafe)
        v[ok], grad[ok] = v_ok, g_ok
        active[ok] = v_ok.max(-1).values > -margin
        bad = ~torch.isfinite(v_ok).all(-1) | ~torch.isfinite(g_ok).all(-1)
        if bool(bad.any()):
            failed[ok[bad]] = True
            active[ok[bad]] = False
    return SolveResult(x, steps, v.max(-1).values, failed)


def solve_static(
    poly: SafetyPolytope,
    h: torch.Tensor,
    *,
    margin: float = 1.0,
    lambda_safe: float = 0.0,
    lambda_unsafe: float = 10.0,
    max_steps: int = 50,
    overshoot: float = 1.2,
    basis: torch.Tensor | None = None,
    nonnegative: bool = False,
) -> SolveResult:
    """:func:`solve` as fixed-shape tensor code: exactly ``max_steps`` masked iterations over every row.

    Same iterates as :func:`solve` (a row stops updating once it is inside with the margin, or once
    a step would be non-finite), but with no data-dependent shapes and no host synchronisation, so
    it runs inside a CUDA graph and never stalls a GPU stream. It spends ``max_steps`` iterations
    even when every row is done early; :class:`~sapguard.steer.modes.SafeFlow` uses it on CUDA.
    Closed-form encoders only (:func:`closed_form_ok`).
    """
    if not closed_form_ok(poly):
        raise SapError("solve_static needs an identity or one-layer encoder (closed-form gradient)")
    l1_weight = None if basis is None else basis.abs().sum(-1) / h.shape[-1]
    x = h.clone()
    steps = torch.zeros(len(h), dtype=torch.long, device=h.device)
    v, grad = margins_and_grad(poly, x, margin, lambda_safe, lambda_unsafe)
    failed = ~torch.isfinite(v).all(-1) | ~torch.isfinite(grad).all(-1)
    active = (v.max(-1).values > -margin) & ~failed
    for _ in range(max(int(max_steps), 1)):
        new = _ista_step(x, h, v, grad, margin, lambda_unsafe, overshoot, basis, l1_weight, nonnegative)
        finite = torch.isfinite(new).all(-1)
        failed = failed | (active & ~finite)
        take = active & finite
        x = torch.where(take[:, None], new, x)
        steps = steps + take.long()
        v_new, g_new = margins_and_grad(poly, x, margin, lambda_safe, lambda_unsafe)
        bad = ~torch.isfinite(v_new).all(-1) | ~torch.isfinite(g_new).all(-1)
        failed = failed | (take & bad)
        v = torch.where(take[:, None], v_new, v)
        grad = torch.where(take[:, None], g_new, grad)
        active = take & ~bad & (v_new.max(-1).values > -margin)
    return SolveResult(x, steps, v.max(-1).values, failed)


def polytope_on(poly: SafetyPolytope, device: torch.device | str) -> SafetyPolytope:
    """``poly`` itself when it is float32 on ``device``, else a float32 copy of its tensors there.

    Only tensors and meta are copied (never a cached model), and building the copy consumes no
    random numbers (sampled generation stays reproducible).
    """
    device = torch.device(device)
    tensors = poly.state_dict()
    if all(t.device == device and t.dtype == torch.float32 for t in tensors.values()):
        return poly
    with torch.device("meta"):
        copy = SafetyPolytope(poly.hidden_size, poly.num_facets, poly.encoder.spec, meta=poly.meta)
    copy.load_state_dict({k: v.detach().to(device, torch.float32) for k, v in tensors.items()}, assign=True)
    copy.eval()
    copy.requires_grad_(False)
    return copy
