"""A steering artifact on disk and in memory: the gate with its target attached.

On disk the gate is the artifact directory and the target its ``target/`` sub-directory (both
``config.json`` + ``model.safetensors``; never pickle). :func:`load_steering` loads both and attaches
the target to the gate, so ``make_mode("safeflow", gate)`` solves the target's constraints while the
hook fires on the gate. Training lives in :mod:`sapguard.steer.target`.
"""

from __future__ import annotations

from pathlib import Path

from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope

TARGET_DIR = "target"
_ATTR = "steering_target"


def attach_target(gate: SafetyPolytope, target: SafetyPolytope | None) -> SafetyPolytope:
    """Attach ``target`` to ``gate`` (not a submodule: the gate's weights and saving are unchanged)."""
    if target is not None and target.hidden_size != gate.hidden_size:
        raise SapError(f"target hidden size {target.hidden_size} differs from the gate's {gate.hidden_size}")
    gate.__dict__[_ATTR] = target
    return gate


def target_of(gate: SafetyPolytope) -> SafetyPolytope | None:
    """The target attached to ``gate``, or ``None`` (SafeFlow then solves the gate itself)."""
    target = gate.__dict__.get(_ATTR)
    return target if isinstance(target, SafetyPolytope) else None


def save_steering(gate: SafetyPolytope, directory: str | Path) -> None:
    """Write the gate to ``directory`` and its attached target (if any) to ``directory/target``."""
    from sapguard.polytope.artifact import save_polytope

    save_polytope(gate, directory)
    target = target_of(gate)
    if target is not None:
        save_polytope(target, Path(directory) / TARGET_DIR)


def load_steering(directory: str | Path) -> SafetyPolytope:
    """Load a steering artifact: the gate, with the target of ``directory/target`` attached if present."""
    from sapguard.polytope.artifact import CONFIG, load_polytope

    gate = load_polytope(directory)
    sub = Path(directory) / TARGET_DIR
    if (sub / CONFIG).is_file():
        target = load_polytope(sub)
        if target.meta.get("layer") != gate.meta.get("layer"):
            raise SapError(f"{sub}: target layer {target.meta.get('layer')} differs from the gate's")
        attach_target(gate, target)
    return gate
