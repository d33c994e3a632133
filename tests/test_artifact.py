"""Artifacts round-trip exactly, never unpickle, and refuse tampered files or another model."""

from __future__ import annotations

import json

import pytest
import torch

from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.polytope.artifact import check_compatible, load_polytope
from sapguard.polytope.model import EncoderSpec, SafetyPolytope


@pytest.fixture
def poly() -> SafetyPolytope:
    torch.manual_seed(0)
    p = SafetyPolytope(16, 3, EncoderSpec("mlp", width=8), meta={
        "layer": 2, "policy": "last_prompt", "template": "chat",
        "base_model": {"id": "tiny-llama", "revision": "test", "hidden_size": 16, "num_layers": 4},
        "facet_names": ["violence", "privacy", "fraud"],
        "calibration": {"offset": 0.25, "target_fpr": 0.05, "risk": {"a": 2.0, "b": 0.0}, "split": "validation"},
    })
    p.offset.fill_(0.25)
    return p


def test_round_trip_is_exact(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    loaded = SafetyPolytope.from_pretrained(tmp_path / "p")
    h = torch.randn(5, 16)
    assert torch.equal(loaded(h), poly(h))
    assert torch.equal(loaded.margins(h), poly.margins(h))
    assert loaded.facet_names == ["violence", "privacy", "fraud"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["library_version"] and config["hidden_size"] == 16 and config["layer"] == 2
    assert list(config) == sorted(config)
    assert "Safety polytope" in (tmp_path / "p" / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_renamed_facets_are_used(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["facet_names"] = ["a", "b", "c"]
    path.write_text(json.dumps(config))
    assert load_polytope(tmp_path / "p").facet_names == ["a", "b", "c"]


def test_tampered_weights_are_refused(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SapError, match="checksum"):
        load_polytope(tmp_path / "p")


def test_truncated_weights_are_refused(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SapError, match=r"model\.safetensors"):
        load_polytope(tmp_path / "p")


@pytest.mark.parametrize("edit", ["{not json", '{"format": "sapguard-polytope"}', "[]"])
def test_broken_config_is_refused(poly, tmp_path, edit):
    poly.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(edit)
    with pytest.raises(SapError, match=r"config\.json"):
        load_polytope(tmp_path / "p")


def test_config_that_does_not_fit_the_weights(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["num_facets"] = 7
    path.write_text(json.dumps(config))
    with pytest.raises(SapError, match="do not fit"):
        load_polytope(tmp_path / "p")


def test_other_model_is_refused(poly):
    ok = {"id": "tiny-llama", "hidden_size": 16, "num_layers": 4}
    check_compatible(poly, ok)
    with pytest.raises(ArtifactMismatchError, match="hidden size"):
        check_compatible(poly, {**ok, "hidden_size": 32})
    with pytest.raises(ArtifactMismatchError, match="trained on"):
        check_compatible(poly, {**ok, "id": "other"})
    with pytest.raises(ArtifactMismatchError, match="layer"):
        check_compatible(poly, {**ok, "num_layers": 1})


def test_save_over_existing_directory_replaces_it(poly, tmp_path):
    poly.save_pretrained(tmp_path / "p")
    poly.meta["facet_names"] = ["x", "y", "z"]
    poly.save_pretrained(tmp_path / "p")
    assert load_polytope(tmp_path / "p").facet_names == ["x", "y", "z"]
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_artifact_module_keeps_its_api():
    """The format moved beside the class (no model <-> artifact cycle); artifact still exports it all."""
    from sapguard.polytope import artifact, model

    for name in ("CONFIG", "WEIGHTS", "CARD", "FORMAT", "FORMAT_VERSION", "save_polytope", "load_polytope",
                 "read_config", "polytope_config", "model_card"):
        assert getattr(artifact, name) is getattr(model, name)
    for name in ("check_compatible", "default_polytope", "load_polytope_spec", "DEFAULT_DETECTOR"):
        assert hasattr(artifact, name)
    assert artifact.DEFAULT_DETECTOR.parent.name == "assets"
