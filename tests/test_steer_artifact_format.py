"""The steering artifact's redirect direction on disk: a float32 tensor in ``steering.safetensors``
(new), or a JSON list in ``config.json`` (older artifacts, still loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sapguard.errors import SapError
from sapguard.polytope.artifact import load_polytope, save_polytope
from sapguard.polytope.model import EncoderSpec, SafetyPolytope
from sapguard.steer.artifact import (
    DIRECTION_FILE,
    attach_target,
    load_steering,
    save_steering,
    target_of,
)
from sapguard.steer.modes import Redirect, make_mode, steering_direction

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "sapguard" / "assets" / "steering"
HIDDEN = 32


def _gate(direction: list[float], *, target: bool = True) -> SafetyPolytope:
    torch.manual_seed(0)
    gate = SafetyPolytope(HIDDEN, 3, EncoderSpec(width=8), meta={"layer": 2, "template": "chat"})
    gate.meta["steering"] = {
        "direction": direction,
        "direction_source": "test",
        "defaults": {"redirect": {"alpha": 1.5}},
    }
    if target:
        attach_target(gate, SafetyPolytope(HIDDEN, 2, EncoderSpec(width=8), meta={"layer": 2}))
    return gate


def _direction(seed: int = 1) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_save_load_round_trip_gives_the_identical_direction_tensor(tmp_path):
    u = _direction()
    gate = _gate(u.tolist())
    save_steering(gate, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "direction" not in config["steering"]  # no JSON list any more
    reference = config["steering"]["direction_tensor"]
    assert reference["file"] == DIRECTION_FILE and reference["shape"] == [HIDDEN]
    assert reference["dtype"] == "float32" and len(reference["sha256"]) == 64
    assert (tmp_path / "a" / DIRECTION_FILE).is_file()
    assert gate.meta["steering"]["direction"] == u.tolist()  # saving leaves the gate in memory as it was

    loaded = load_steering(tmp_path / "a")
    assert torch.equal(steering_direction(loaded), u)
    assert "direction_tensor" not in loaded.meta["steering"]
    assert loaded.meta["steering"]["direction_source"] == "test"
    assert target_of(loaded) is not None and target_of(loaded).num_facets == 2
    mode = make_mode("redirect", loaded)
    assert isinstance(mode, Redirect) and mode.alpha == 1.5 and torch.equal(mode.direction, u)

    save_steering(loaded, tmp_path / "b")  # and again: bit-identical file
    assert (tmp_path / "a" / DIRECTION_FILE).read_bytes() == (tmp_path / "b" / DIRECTION_FILE).read_bytes()
    assert torch.equal(steering_direction(load_steering(tmp_path / "b")), u)


def test_a_tensor_direction_in_memory_is_saved_too(tmp_path):
    u = _direction(2)
    save_steering(_gate(u, target=False), tmp_path)  # type: ignore[arg-type]
    assert torch.equal(steering_direction(load_steering(tmp_path)), u)


def test_legacy_json_list_artifact_still_loads(tmp_path):
    legacy = [round(float(v), 5) for v in _direction(3)]  # what train_steering stored in config.json
    gate = _gate(legacy)
    save_polytope(gate, tmp_path)  # the old save_steering: gate (direction in config.json) + target/
    save_polytope(target_of(gate), tmp_path / "target")  # type: ignore[arg-type]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["steering"]["direction"] == legacy and not (tmp_path / DIRECTION_FILE).exists()

    loaded = load_steering(tmp_path)
    expected = torch.tensor(legacy, dtype=torch.float32)
    assert torch.equal(steering_direction(loaded), expected)
    assert target_of(loaded) is not None
    # re-saved in the new format, the direction the hook uses is bit-identical to the legacy one
    save_steering(loaded, tmp_path / "new")
    assert "direction" not in json.loads((tmp_path / "new" / "config.json").read_text())["steering"]
    assert torch.equal(steering_direction(load_steering(tmp_path / "new")), expected)


def test_no_direction_saves_no_direction_file(tmp_path):
    gate = _gate([], target=False)
    gate.meta["steering"].pop("direction")
    save_steering(gate, tmp_path)
    assert not (tmp_path / DIRECTION_FILE).exists()
    with pytest.raises(SapError, match="no steering direction"):
        steering_direction(load_steering(tmp_path))


def test_a_modified_or_missing_direction_file_is_refused(tmp_path):
    save_steering(_gate(_direction().tolist()), tmp_path)
    path = tmp_path / DIRECTION_FILE
    blob = path.read_bytes()
    path.write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(SapError, match="checksum"):
        load_steering(tmp_path)
    path.unlink()
    with pytest.raises(SapError, match="not found"):
        load_steering(tmp_path)


def test_plain_polytope_loading_points_to_load_steering(tmp_path):
    save_steering(_gate(_direction().tolist()), tmp_path)
    with pytest.raises(SapError, match="load_steering"):
        steering_direction(load_polytope(tmp_path))


def test_shipped_artifact_direction():
    gate = load_steering(SHIPPED)
    u = steering_direction(gate)
    assert u.shape == (gate.hidden_size,) and u.dtype == torch.float32 and bool(torch.isfinite(u).all())
    assert target_of(gate) is not None
    config = json.loads((SHIPPED / "config.json").read_text())
    if "direction_tensor" in config["steering"]:  # the new format: the file is shipped beside the gate
        assert (SHIPPED / DIRECTION_FILE).is_file() and "direction" not in config["steering"]


def test_the_server_loads_a_steering_artifact_whole(tmp_path):
    """``sap serve -p DIR`` gets the gate with its direction and its target (SafeFlow's region)."""
    from sapguard.serve.config import ServeConfig
    from sapguard.serve.server import load_polytope_for
    from sapguard.steer.artifact import target_of

    u = _direction()
    save_steering(_gate(u.tolist()), tmp_path)
    poly, label = load_polytope_for(ServeConfig(polytope=str(tmp_path)))
    assert label == str(tmp_path) and target_of(poly) is not None
    assert torch.equal(torch.tensor(poly.meta["steering"]["direction"], dtype=torch.float32), u.float())
