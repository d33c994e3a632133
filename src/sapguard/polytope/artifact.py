"""Polytope artifacts, like peft adapters: ``config.json`` + ``model.safetensors`` + ``README.md``.

Loading never unpickles: weights come from safetensors, everything else from JSON. The config
records the weights' SHA-256, so a truncated or modified file is refused with a one-line error.

The format itself (:func:`save_polytope`, :func:`load_polytope`, :func:`read_config`, the card) is
defined in :mod:`sapguard.polytope.model`, beside ``SafetyPolytope.save_pretrained`` /
``from_pretrained``, and re-exported here, so imports point one way (artifact -> model). This module
adds what sits on top of the format: the shipped default detector and the base-model check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.polytope.model import (
    CARD,
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS,
    SafetyPolytope,
    load_polytope,
    model_card,
    polytope_config,
    read_config,
    save_polytope,
)

__all__ = [
    "CARD",
    "CONFIG",
    "DEFAULT_DETECTOR",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS",
    "check_compatible",
    "default_polytope",
    "load_polytope",
    "load_polytope_spec",
    "model_card",
    "polytope_config",
    "read_config",
    "save_polytope",
]


def check_compatible(poly: SafetyPolytope, identity: dict[str, Any]) -> None:
    """Refuse a base model whose id or hidden size differs from the one the polytope was trained on."""
    base = poly.meta.get("base_model") or {}
    if identity["hidden_size"] != poly.hidden_size:
        raise ArtifactMismatchError(
            f"polytope expects hidden size {poly.hidden_size}, model {identity['id']} has {identity['hidden_size']}"
        )
    if base.get("id") and base["id"] != identity["id"]:
        raise ArtifactMismatchError(
            f"polytope was trained on {base['id']!r}, not {identity['id']!r}; pass the matching model"
        )
    layer = poly.meta.get("layer")
    if layer is not None and not 1 <= int(layer) <= identity["num_layers"]:
        raise ArtifactMismatchError(f"polytope layer {layer} does not exist in a {identity['num_layers']}-block model")


DEFAULT_DETECTOR = Path(__file__).resolve().parent.parent / "assets" / "detector"
"""The detection polytope shipped with the package (trained on the full default corpus for the
embedded default model by ``python benchmarks/train_default_detector.py``)."""


def default_polytope() -> SafetyPolytope:
    """Load the shipped default detection polytope (for the embedded default model).

    Raises:
        SapError: the package was installed without its data files.
    """
    if not (DEFAULT_DETECTOR / CONFIG).is_file():
        raise SapError(f"{DEFAULT_DETECTOR}: the shipped default polytope is missing; reinstall sapguard")
    return load_polytope(DEFAULT_DETECTOR)


def load_polytope_spec(spec: str | Path) -> SafetyPolytope:
    """``"default"`` for the shipped detector, else an artifact directory."""
    return default_polytope() if str(spec) == "default" else load_polytope(spec)
