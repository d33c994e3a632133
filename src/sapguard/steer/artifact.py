"""A steering artifact on disk and in memory: the gate with its target attached.

On disk the gate is the artifact directory and the target its ``target/`` sub-directory (both
``config.json`` + ``model.safetensors``; never pickle). :func:`load_steering` loads both and attaches
the target to the gate, so ``make_mode("safeflow", gate)`` solves the target's constraints while the
hook fires on the gate. Training lives in :mod:`sapguard.steer.target`.

The redirect direction (``meta["steering"]["direction"]`` in memory: a list of floats, so the meta
stays JSON) is saved as a float32 tensor in ``steering.safetensors`` beside the gate; the config's
``steering.direction_tensor`` names the file, the tensor, its shape and the file's SHA-256. Older
artifacts hold the direction as a JSON list in ``config.json`` (``steering.direction``); they load
unchanged (and :func:`~sapguard.polytope.artifact.load_polytope` alone reads only those, so a
steering artifact is loaded with :func:`load_steering`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sapguard.errors import SapError
from sapguard.polytope.model import SafetyPolytope

TARGET_DIR = "target"
DIRECTION_FILE = "steering.safetensors"
DIRECTION_TENSOR = "direction"
DIRECTION_FORMAT = "sapguard-steering-direction"
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
    """Write the gate to ``directory``, its direction to ``directory/steering.safetensors`` and its
    attached target (if any) to ``directory/target``."""
    from sapguard.polytope.artifact import save_polytope

    steering = gate.meta.get("steering")
    if isinstance(steering, dict) and steering.get("direction") is not None:
        blob, reference = direction_blob(steering["direction"])
        stored = {k: v for k, v in steering.items() if k not in ("direction", "direction_tensor")}
        meta = gate.meta
        gate.meta = {**meta, "steering": {**stored, "direction_tensor": reference}}
        try:
            save_polytope(gate, directory)
        finally:
            gate.meta = meta
        from sapguard.io import atomic_write

        with atomic_write(Path(directory) / DIRECTION_FILE, "wb") as fh:
            fh.write(blob)
    else:
        save_polytope(gate, directory)
    target = target_of(gate)
    if target is not None:
        save_polytope(target, Path(directory) / TARGET_DIR)


def direction_blob(direction: Any) -> tuple[bytes, dict[str, Any]]:
    """``steering.safetensors``'s bytes for ``direction`` (``[d]``, stored as float32) and the config's
    reference to it (file, tensor name, shape, dtype, SHA-256)."""
    from safetensors.torch import save

    from sapguard.io import sha256_bytes

    if isinstance(direction, torch.Tensor):
        tensor = direction.detach().to("cpu", torch.float32)
    else:
        tensor = torch.tensor(direction, dtype=torch.float32)
    if tensor.dim() != 1:
        raise SapError(f"steering direction must be one vector, got shape {list(tensor.shape)}")
    blob = save({DIRECTION_TENSOR: tensor.contiguous()}, metadata={"format": DIRECTION_FORMAT})
    reference = {
        "file": DIRECTION_FILE,
        "tensor": DIRECTION_TENSOR,
        "shape": list(tensor.shape),
        "dtype": "float32",
        "sha256": sha256_bytes(blob),
    }
    return blob, reference


def load_direction(gate: SafetyPolytope, directory: str | Path) -> None:
    """Read the direction that ``gate``'s config refers to (``steering.direction_tensor``) from
    ``directory`` into ``gate.meta["steering"]["direction"]``; a legacy JSON-list direction (or none)
    is left as it is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sapguard.io import sha256_file

    steering = gate.meta.get("steering")
    if not isinstance(steering, dict) or "direction_tensor" not in steering:
        return
    reference = steering["direction_tensor"]
    name = reference.get("file") if isinstance(reference, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not name:
        raise SapError(f"{directory}: steering.direction_tensor must name a file of the artifact directory")
    path = Path(directory) / name
    if not path.is_file():
        raise SapError(f"{path}: not found (the steering direction)")
    if sha256_file(path) != reference.get("sha256"):
        raise SapError(f"{path}: checksum does not match config.json (truncated or modified)")
    try:
        tensor = load_file(str(path)).get(str(reference.get("tensor", DIRECTION_TENSOR)))
    except (SafetensorError, OSError) as err:
        raise SapError(f"{path}: unreadable safetensors ({err})") from None
    if tensor is None or tensor.dim() != 1 or len(tensor) != gate.hidden_size:
        raise SapError(f"{path}: no direction of size {gate.hidden_size}")
    steering.pop("direction_tensor")
    steering["direction"] = tensor.to(torch.float32).tolist()


def load_steering(directory: str | Path) -> SafetyPolytope:
    """Load a steering artifact: the gate with its direction, and the target of ``directory/target``
    attached if present."""
    from sapguard.polytope.artifact import CONFIG, load_polytope

    gate = load_polytope(directory)
    load_direction(gate, directory)
    sub = Path(directory) / TARGET_DIR
    if (sub / CONFIG).is_file():
        target = load_polytope(sub)
        if target.meta.get("layer") != gate.meta.get("layer"):
            raise SapError(f"{sub}: target layer {target.meta.get('layer')} differs from the gate's")
        attach_target(gate, target)
    return gate
