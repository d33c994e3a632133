"""Polytope training: recovers a known polytope, spreads unsafe rows over facets, calibrates on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.polytope.train import TrainConfig, assign_facets, calibrate_offset, train_polytope


def known_polytope(n: int, seed: int, gap: float = 0.05):
    """Points in R^8 labelled unsafe when they break any of 4 fixed linear constraints."""
    normals = torch.randn(4, 8, generator=torch.Generator().manual_seed(99))
    normals = normals / normals.norm(dim=1, keepdim=True)
    x = torch.randn(3 * n, 8, generator=torch.Generator().manual_seed(seed))
    v = x @ normals.T - 0.8
    keep = (v.abs() > gap).all(dim=1)  # a thin gap around the facets, so the truth is learnable
    x, v = x[keep][:n], v[keep][:n]
    return x, (v > 0).any(dim=1).long().numpy(), v[:n].argmax(dim=1).numpy()


@pytest.mark.parametrize("encoder", [EncoderSpec("identity"), EncoderSpec("mlp", width=64)])
def test_recovers_known_polytope(encoder):
    x_tr, y_tr, _ = known_polytope(6000, 0)
    x_val, y_val, _ = known_polytope(1000, 1)
    x_te, y_te, _ = known_polytope(2000, 2)
    cfg = TrainConfig(num_facets=4, encoder=encoder, margin=0.1, lambda_f=0, lambda_phi=0, lr=1e-2, epochs=30,
                      patience=30, target_fpr=0.01)
    poly = train_polytope(x_tr, y_tr, x_val, y_val, cfg).polytope
    with torch.no_grad():
        accuracy = ((poly.score(x_te) > 0).numpy() == y_te).mean()
    print(f"accuracy {accuracy:.4f}")
    assert accuracy > 0.98


def test_facet_assignment_spreads_unsafe_rows():
    v = torch.zeros(100, 5)
    v[:, 0] = 1.0  # every row prefers facet 0
    plain = assign_facets(v, torch.zeros(5), entropy_weight=0.0)
    spread = assign_facets(v, torch.zeros(5), entropy_weight=1.0)
    assert plain.tolist() == [0] * 100
    counts = np.bincount(spread.numpy(), minlength=5)
    assert (counts > 0).all() and counts[0] < 100 and counts[0] == counts.max()


def test_assignment_keeps_clear_preferences():
    v = torch.full((40, 4), -10.0)
    v[torch.arange(40), torch.arange(40) % 4] = 10.0  # each row clearly violates one facet
    assigned = assign_facets(v, torch.zeros(4), entropy_weight=1.0)
    assert assigned.tolist() == (torch.arange(40) % 4).tolist()


def test_calibration_hits_target_fpr_on_validation():
    safe_scores = np.linspace(-1, 1, 1000)
    offset = calibrate_offset(safe_scores, 0.05)
    assert np.mean(safe_scores > offset) <= 0.05
    assert np.mean(safe_scores > offset) >= 0.04


def test_trained_polytope_is_calibrated_and_named():
    x_tr, y_tr, facet = known_polytope(2000, 0)
    x_val, y_val, _ = known_polytope(1000, 1)
    cats = ["violence", "privacy", "fraud", "drugs"]
    records = [Record(f"t{i}", is_safe=not y, categories=(cats[f],) if y else ()) for i, (y, f) in enumerate(zip(y_tr, facet))]
    cfg = TrainConfig(num_facets=4, encoder=EncoderSpec("identity"), margin=0.1, lambda_f=0, lambda_phi=0, lr=1e-2,
                      epochs=20, target_fpr=0.02)
    poly = train_polytope(x_tr, y_tr, x_val, y_val, cfg, train_records=records).polytope
    with torch.no_grad():
        fpr = (poly.score(x_val[y_val == 0]) > 0).float().mean().item()
    assert fpr <= 0.02
    assert poly.meta["calibration"]["split"] == "validation"
    assert set(poly.facet_names) <= {f"{c}{s}" for c in cats for s in ("", "_2", "_3", "_4")}
    assert len(set(poly.facet_names)) == 4
    # one naming scheme: training's names are the specialisation analysis' names, and the stats agree
    from sapguard.polytope.specialisation import analyse_specialisation, suggested_names

    assert poly.facet_names == suggested_names(analyse_specialisation(poly, x_tr, y_tr, records))
    assert [s["name"] for s in poly.meta["facet_stats"]] == poly.facet_names
    assert all(any(s["name"].startswith(c) for c in s["mi_bits"]) for s in poly.meta["facet_stats"])


def test_rejects_nan_features_and_single_class():
    x = torch.randn(20, 4)
    y = np.array([0, 1] * 10)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(SapError, match="NaN"):
        train_polytope(bad, y, x, y)
    with pytest.raises(SapError, match="both safe and unsafe"):
        train_polytope(x, np.zeros(20, dtype=int), x, y)


def test_violation_shapes_and_margins():
    poly = SafetyPolytope(6, 3, EncoderSpec("mlp", width=10, depth=2))
    h = torch.randn(5, 7, 6)
    assert poly(h).shape == (5, 7, 3)
    poly.offset.fill_(0.5)
    assert torch.allclose(poly.margins(h), poly(h) - 0.5)
    assert torch.allclose(poly.score(h), (poly(h) - 0.5).max(dim=-1).values)


def test_batched_readings_equal_one_pass_over_all_rows():
    """raw_scores, facet_assignments and polytope_margins read rows in batches; same numbers as one pass."""
    from sapguard.polytope.specialisation import polytope_margins
    from sapguard.polytope.train import facet_assignments, raw_scores

    poly = SafetyPolytope(6, 3, EncoderSpec("mlp", width=10, depth=1))
    poly.offset.fill_(0.25)
    x = torch.randn(4096 + 905, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = poly(x)
    assert np.allclose(raw_scores(poly, x), v.max(dim=1).values.numpy(), atol=1e-6)
    assert np.array_equal(facet_assignments(poly, x), v.argmax(dim=1).numpy())
    margins = polytope_margins(poly, x)
    assert margins.dtype == np.float32 and np.allclose(margins, (v - 0.25).numpy(), atol=1e-6)
    assert raw_scores(poly, x[:0]).shape == (0,) and polytope_margins(poly, x[:0]).shape == (0, 3)
