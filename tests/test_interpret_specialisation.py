"""Facet specialisation: MI, Hungarian matching and naming on synthetic data with a known answer.

Also holds the synthetic polytope and features the other interpret tests import.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.features.store import FeatureSet
from sapguard.interpret.naming import apply_facet_names
from sapguard.polytope.artifact import load_polytope
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.polytope.specialisation import (
    analyse_specialisation,
    match_categories,
    mi_matrix,
    mutual_information,
    quantile_bins,
    suggested_names,
)

D = 8
# Facet k's normal is the unit vector e_{NORMAL_DIM[k]}; category c lives along e_{CATEGORY_DIM[c]}.
NORMAL_DIM = [5, 2, 7, 0]
CATEGORY_DIM = {"violence": 0, "privacy": 2, "fraud": 5}
EXPECTED = {"violence": 3, "privacy": 1, "fraud": 0}  # facet 2 (e_7) matches nothing and never fires


def synthetic_polytope(xi: float = 1.0) -> SafetyPolytope:
    poly = SafetyPolytope(D, 4, EncoderSpec("identity"), meta={"layer": 3, "base_model": {"id": "synthetic"}})
    with torch.no_grad():
        poly.phi.zero_()
        for k, dim in enumerate(NORMAL_DIM):
            poly.phi[k, dim] = 1.0
        poly.xi.fill_(xi)
    poly.eval()
    return poly


def synthetic_rows(n_per: int = 40, seed: int = 0, with_categories: bool = True):
    """Unsafe rows pushed along their categories' directions (some multi-label), safe rows as noise."""
    rng = np.random.default_rng(seed)
    xs, records = [], []
    splits = ["train", "validation", "test"]
    for cat, dim in CATEGORY_DIM.items():
        for i in range(n_per):
            x = rng.normal(0, 0.3, D)
            x[dim] += rng.uniform(2.0, 4.0)
            xs.append(x)
            records.append((f"{cat} request {i}", False, (cat,)))
    for i in range(10):  # multi-label rows: violence and privacy at once
        x = rng.normal(0, 0.3, D)
        x[CATEGORY_DIM["violence"]] += 3.0
        x[CATEGORY_DIM["privacy"]] += 3.0
        xs.append(x)
        records.append((f"violent doxxing request {i}", False, ("violence", "privacy")))
    for i in range(3 * n_per):
        xs.append(rng.normal(0, 0.3, D))
        records.append((f"harmless question {i}", True, ()))
    recs = [
        Record(
            prompt=p,
            is_safe=safe,
            categories=cats if with_categories else (),
            split=splits[i % 3],
            source="synthetic",
        )
        for i, (p, safe, cats) in enumerate(records)
    ]
    return (
        torch.tensor(np.array(xs), dtype=torch.float32),
        np.array([0 if r.is_safe else 1 for r in recs]),
        recs,
    )


def synthetic_featureset(**kwargs) -> FeatureSet:
    x, _, recs = synthetic_rows(**kwargs)
    # Rows in a shuffled order, so that a row's record is found only through record_index.
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    manifest = {
        "layer": 3,
        "hidden_size": D,
        "model": {"id": "synthetic"},
        "policy": "last_prompt",
        "template": "none",
    }
    return FeatureSet(x[order], order.clone(), torch.zeros(len(x), dtype=torch.long), recs, manifest)


def test_mutual_information_basics():
    a = np.array([0, 1] * 50)
    assert mutual_information(a, a) == pytest.approx(1.0)
    assert mutual_information(a, np.array([0, 0, 1, 1] * 25)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(a, np.zeros(100)) == 0.0
    assert mutual_information(np.array([]), np.array([])) == 0.0


def _mi_bits_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """The plug-in MI formula ``mutual_information`` used before it delegated to scikit-learn."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum()))


def test_mutual_information_equals_the_hand_formula():
    rng = np.random.default_rng(0)
    for n, ka, kb in [(1, 1, 1), (7, 2, 3), (100, 2, 10), (500, 5, 10), (2000, 2, 2)]:
        a = rng.integers(0, ka, n).astype(bool) if ka == 2 else rng.integers(0, ka, n)
        b = rng.normal(size=n).round(1) if kb == 10 else rng.integers(0, kb, n)
        b = np.where(rng.random(n) < 0.5, a, b) if kb == 10 else b  # some dependence
        assert abs(mutual_information(a, b) - _mi_bits_by_hand(a, b)) <= 1e-9
    margins = rng.normal(size=(300, 3))
    indicators = rng.random((300, 2)) < 0.3
    margins[:, 0] += 2.0 * indicators[:, 0]
    expected = np.array(
        [[_mi_bits_by_hand(ind, quantile_bins(m, 10)) for m in margins.T] for ind in indicators.T]
    )
    np.testing.assert_allclose(mi_matrix(indicators, margins), expected, rtol=0, atol=1e-9)


def test_quantile_bins_merge_ties():
    assert len(set(quantile_bins(np.full(50, 3.0), 10).tolist())) == 1
    assert len(set(quantile_bins(np.arange(100.0), 10).tolist())) == 10
    assert quantile_bins(np.array([]), 10).size == 0


def test_mi_matrix_checks_its_options():
    with pytest.raises(SapError, match="mode"):
        mi_matrix(np.zeros((3, 1), bool), np.zeros((3, 2)), mode="nope")
    with pytest.raises(SapError, match="bins"):
        mi_matrix(np.zeros((3, 1), bool), np.zeros((3, 2)), bins=1)


def test_matching_recovers_the_known_pairs():
    x, y, recs = synthetic_rows()
    spec = analyse_specialisation(synthetic_polytope(), x, y, recs)
    assert spec.categories == ["fraud", "privacy", "violence"]
    assert {p["category"]: p["facet"] for p in spec.matching} == EXPECTED
    for p in spec.matching:
        c = spec.categories.index(p["category"])
        assert spec.mi_binned[c, p["facet"]] == spec.mi_binned[c].max() > spec.chance_mi
        assert spec.mi_fired[c, p["facet"]] == spec.mi_fired[c].max() > 0.3
    # multi-label rows count for each of their categories; only unsafe rows are analysed
    assert dict(zip(spec.categories, spec.category_rows)) == {"fraud": 40, "privacy": 50, "violence": 50}
    assert spec.rows == 130 and spec.unsafe_only
    assert spec.fired[2] == 0 and any("never fire" in n and "facet_2" in n for n in spec.notes)


def test_hungarian_is_one_to_one_on_rectangular_matrices():
    mi = np.array([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])
    assert match_categories(mi) == [(0, 1), (1, 0)]  # total 1.65 beats the greedy 0.9 + 0.1
    assert match_categories(mi.T) == [(0, 1), (1, 0)]
    assert match_categories(np.zeros((0, 4))) == []


def test_suggested_names_and_renaming_the_artifact(tmp_path):
    x, y, recs = synthetic_rows()
    poly = synthetic_polytope()
    spec = analyse_specialisation(poly, x, y, recs)
    names = suggested_names(spec)
    assert names[0] == "fraud" and names[1] == "privacy" and names[3] == "violence"
    assert names[2].startswith(("facet_2", "fraud_", "privacy_", "violence_"))
    poly.save_pretrained(tmp_path / "poly")
    weights = (tmp_path / "poly" / "model.safetensors").read_bytes()
    (tmp_path / "poly" / "target").mkdir()  # a steering artifact's other files survive a renaming
    (tmp_path / "poly" / "steering.safetensors").write_bytes(b"direction")
    assert apply_facet_names(tmp_path / "poly", names) == ["facet_0", "facet_1", "facet_2", "facet_3"]
    reloaded = load_polytope(tmp_path / "poly")
    assert reloaded.facet_names == names and names[0] in (tmp_path / "poly" / "README.md").read_text()
    assert (tmp_path / "poly" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "poly" / "target").is_dir()
    assert (tmp_path / "poly" / "steering.safetensors").read_bytes() == b"direction"
    assert torch.equal(reloaded.phi, poly.phi)
    with pytest.raises(SapError, match="3 facet names given for 4"):
        apply_facet_names(tmp_path / "poly", ["a", "b", "c"])
    with pytest.raises(SapError, match="duplicate facet names a"):
        apply_facet_names(tmp_path / "poly", ["a", "a", "b", "c"])
    assert load_polytope(tmp_path / "poly").facet_names == names


def test_data_without_categories_runs_and_says_what_is_skipped():
    x, y, recs = synthetic_rows(with_categories=False)
    spec = analyse_specialisation(synthetic_polytope(), x, y, recs)
    assert not spec.has_categories and spec.matching == [] and spec.mi_binned.shape == (0, 4)
    assert any("no category labels" in n and "matching" in n for n in spec.notes)
    assert suggested_names(spec) == ["facet_0", "facet_1", "facet_2", "facet_3"]


def test_category_without_rows_is_reported_not_matched():
    x, y, recs = synthetic_rows()
    spec = analyse_specialisation(
        synthetic_polytope(), x, y, recs, categories=["fraud", "privacy", "violence", "sexual"]
    )
    assert spec.category_rows[-1] == 0 and not spec.mi_binned[-1].any()
    assert "sexual" not in {p["category"] for p in spec.matching}
    assert {p["category"]: p["facet"] for p in spec.matching} == EXPECTED
    assert any("without rows" in n and "sexual" in n for n in spec.notes)


def test_facets_that_never_fire_do_not_crash():
    x, y, recs = synthetic_rows()
    spec = analyse_specialisation(synthetic_polytope(xi=1e6), x, y, recs)
    assert spec.fired == [0, 0, 0, 0] and not spec.mi_fired.any()
    assert any("no facet fires" in n for n in spec.notes)
    assert len(spec.matching) == 3  # binned margins still carry the ordering


def test_no_unsafe_rows_and_misaligned_inputs():
    x, y, recs = synthetic_rows()
    safe = y == 0
    spec = analyse_specialisation(
        synthetic_polytope(), x[safe], y[safe], [r for r, s in zip(recs, safe) if s]
    )
    assert spec.rows == 0 and any("no unsafe rows" in n for n in spec.notes)
    with pytest.raises(SapError, match="not row-aligned"):
        analyse_specialisation(synthetic_polytope(), x, y[:-1], recs)
