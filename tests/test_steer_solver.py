"""SafeFlow's minimal-edit solver: closed-form gradient, final iterate, stopping rule, subspace."""

from __future__ import annotations

import pytest
import torch

from sapguard.errors import SapError
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.steer.modes import SafeFlow
from sapguard.steer.solver import (
    autograd_margins_and_grad,
    margins_and_grad,
    polytope_on,
    solve,
    solve_static,
)


def _poly(kind: str = "mlp", depth: int = 1, d: int = 16, k: int = 3, seed: int = 0) -> SafetyPolytope:
    torch.manual_seed(seed)
    poly = SafetyPolytope(d, k, EncoderSpec(kind=kind, width=32, depth=depth))
    with torch.no_grad():
        poly.encoder.mean.normal_()
        poly.encoder.scale.uniform_(0.5, 2.0)
        poly.xi.fill_(0.5)
        poly.offset.fill_(0.1)
    poly.eval().requires_grad_(False)
    return poly


@pytest.mark.parametrize("kind", ["mlp", "identity"])
def test_closed_form_gradient_equals_autograd(kind):
    poly = _poly(kind)
    x = torch.randn(20, 16) * 3
    v1, g1 = margins_and_grad(poly, x, 0.7, 0.3, 5.0)
    v2, g2 = autograd_margins_and_grad(poly, x, 0.7, 0.3, 5.0)
    assert torch.allclose(v1, v2, atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5)
    assert bool((g1 != 0).any())


def _violating(poly: SafetyPolytope, n: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    h = torch.randn(400, poly.hidden_size) * 3
    bad = h[poly.margins(h).max(-1).values > 0]
    assert len(bad) >= 4
    return bad[:n]


def test_violating_states_land_inside_final_iterate_checked():
    poly = _poly()
    h = _violating(poly)
    res = solve(poly, h, margin=0.5, max_steps=200)
    # the returned state itself (the final iterate) satisfies every facet with the margin
    assert bool((poly.margins(res.hidden).max(-1).values <= -0.5 + 1e-5).all())
    assert torch.allclose(res.margin, poly.margins(res.hidden).max(-1).values, atol=1e-5)
    assert bool((res.steps >= 1).all()) and not bool(res.failed.any())


def test_one_step_budget_returns_the_stepped_state():
    """max_steps=1 (the reference code's setting) must move the state, not hand it back unchanged."""
    poly = _poly(kind="identity")  # linear facets: one Polyak step with overshoot lands inside
    h = _violating(poly)
    res = solve(poly, h, margin=0.5, max_steps=1, overshoot=1.5, lambda_unsafe=1e4)
    assert bool((res.steps == 1).all())
    assert bool((res.hidden != h).any(-1).all())
    after = poly.margins(res.hidden).max(-1).values
    assert torch.allclose(res.margin, after, atol=1e-5)
    assert bool((after < poly.margins(h).max(-1).values).all())
    # one facet, linear: a single step reaches the margin exactly as the stopping rule demands
    single = _poly(kind="identity", k=1)
    h1 = _violating(single)
    r1 = solve(single, h1, margin=0.5, max_steps=1, overshoot=1.0, lambda_unsafe=1e6)
    assert bool((single.margins(r1.hidden)[:, 0] <= -0.5 + 1e-3).all())


def test_stopping_rule_leaves_satisfied_rows_alone_and_is_minimal():
    poly = _poly()
    h = torch.cat([_violating(poly, 4), torch.zeros(0, 16)])
    inside = h[:0]
    torch.manual_seed(2)
    cand = torch.randn(400, 16) * 3
    inside = cand[poly.margins(cand).max(-1).values < -1.0][:3]
    both = torch.cat([h, inside])
    res = solve(poly, both, margin=0.5, max_steps=200)
    assert torch.equal(res.hidden[len(h) :], inside) and bool((res.steps[len(h) :] == 0).all())
    # the l1 prox keeps the edit sparse-ish: no larger than a plain gradient walk of the same depth
    edit = (res.hidden[: len(h)] - h).abs()
    assert bool((edit.sum(-1) > 0).all())


def test_edit_stays_in_a_planted_subspace():
    poly = _poly(kind="identity", k=1)
    h = _violating(poly)
    u = torch.zeros(16)
    u[3] = 1.0
    res = solve(poly, h, margin=0.2, max_steps=100, basis=u[None, :])
    delta = res.hidden - h
    assert torch.allclose(delta[:, [i for i in range(16) if i != 3]], torch.zeros(len(h), 15))
    # the facet's normal has a component on coordinate 3, so moving along it re-enters
    grad_dir = poly.phi[0, 3] / poly.encoder.scale[3]
    if abs(float(grad_dir)) > 1e-3:
        assert bool((poly.margins(res.hidden).max(-1).values <= -0.2 + 1e-4).all())


def test_nonnegative_basis_moves_only_along_the_refusal_direction():
    """A planted one-facet polytope ``v = w . x - 1``: its safe side lies along ``-w``. With the basis
    ``-w/|w|`` (the "refusal direction") the cone edit reaches the margin along it; with ``+w/|w|``
    the span edit goes against the basis vector, the cone edit refuses to (the state is unchanged)."""
    d = 8
    poly = SafetyPolytope(d, 1, EncoderSpec(kind="identity"))
    w = torch.zeros(d)
    w[2], w[5] = 2.0, -1.0
    with torch.no_grad():
        poly.phi.copy_(w[None, :])
        poly.xi.fill_(1.0)
    poly.eval().requires_grad_(False)
    h = torch.randn(6, d) + 3.0 * w  # violating: w . h - 1 > 0
    assert bool((poly.margins(h).max(-1).values > 0).all())
    u = -w / w.norm()
    res = solve(poly, h, margin=0.5, max_steps=20, basis=u[None, :], nonnegative=True)
    delta = res.hidden - h
    assert bool((poly.margins(res.hidden).max(-1).values <= -0.5 + 1e-4).all())
    assert torch.allclose(
        torch.nn.functional.cosine_similarity(delta, u[None, :], dim=-1), torch.ones(6), atol=1e-5
    )
    against = solve(poly, h, margin=0.5, max_steps=20, basis=-u[None, :], nonnegative=True)
    assert torch.equal(against.hidden, h) and bool((against.margin > 0).all())
    span = solve(poly, h, margin=0.5, max_steps=20, basis=-u[None, :])
    assert bool((poly.margins(span.hidden).max(-1).values <= -0.5 + 1e-4).all())


def test_deeper_encoder_falls_back_to_autograd_under_inference_mode():
    poly = _poly(depth=2)
    h = _violating(poly, 8)
    with torch.inference_mode():
        edit = SafeFlow(margin=0.3, max_steps=300).edit(h, poly)
    assert not bool(edit.failed.any())
    assert bool((poly.margins(edit.hidden).max(-1).values <= -0.3 + 1e-4).all())


def test_safeflow_solves_its_target_not_the_gate():
    gate, target = _poly(seed=0), _poly(seed=5)
    h = _violating(target, 8)
    edit = SafeFlow(margin=0.5, max_steps=200, target=target).edit(h, gate)
    assert bool((target.margins(edit.hidden).max(-1).values <= -0.5 + 1e-4).all())


def test_polytope_on_copies_tensors_only_and_consumes_no_randomness():
    poly = _poly()
    poly.meta["x"] = 1
    assert polytope_on(poly, "cpu") is poly
    half = _poly().to(torch.float64)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    copy = polytope_on(half, "cpu")
    assert torch.equal(torch.rand(3), expected)
    assert copy is not half and copy.phi.dtype == torch.float32
    assert torch.allclose(copy.margins(torch.ones(2, 16)), half.margins(torch.ones(2, 16).double()).float())


@pytest.mark.parametrize("with_basis", [False, True])
def test_static_solver_matches_dynamic(with_basis):
    """The fixed-shape solver (CUDA-graph form) gives solve()'s iterates, steps and margins."""
    poly = _poly()
    h = torch.cat([_violating(poly, 24), torch.randn(8, 16) * 0.1 + poly.encoder.mean])  # some rows inside already
    basis = None
    if with_basis:
        u = torch.randn(16)
        basis = (u / u.norm())[None, :]
    kwargs = {"margin": 0.5, "max_steps": 30, "basis": basis, "nonnegative": with_basis}
    dyn, stat = solve(poly, h, **kwargs), solve_static(poly, h, **kwargs)
    assert torch.equal(dyn.steps, stat.steps) and torch.equal(dyn.failed, stat.failed)
    assert torch.allclose(dyn.hidden, stat.hidden, atol=1e-5)
    assert torch.allclose(dyn.margin, stat.margin, atol=1e-5)
    assert bool((stat.steps == 0).any()) and bool((stat.steps > 1).any())  # both kinds of rows present


def test_static_safeflow_mode_and_deep_encoder_refused():
    poly = _poly()
    h = _violating(poly)
    a, b = SafeFlow(margin=0.5).edit(h, poly), SafeFlow(margin=0.5, static=True).edit(h, poly)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-4)
    # rows that creep along the boundary may take a few steps more or less (batch-shape rounding)
    assert float((a.steps == b.steps).float().mean()) >= 0.9
    assert bool((poly.margins(b.hidden).max(-1).values <= -0.5 + 1e-5).all())
    with pytest.raises(SapError, match="closed-form"):
        solve_static(_poly(depth=2), h)
