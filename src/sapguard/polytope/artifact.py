"""Polytope artifacts, like peft adapters: ``config.json`` + ``model.safetensors`` + ``README.md``.

Loading never unpickles: weights come from safetensors, everything else from JSON. The config
records the weights' SHA-256, so a truncated or modified file is refused with a one-line error.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sapguard._version import __version__
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.io import atomic_write, read_json, sha256_file, write_json
from sapguard.polytope.model import EncoderSpec, SafetyPolytope

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
FORMAT = "sapguard-polytope"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "hidden_size", "num_facets", "encoder", "weights_sha256")


def polytope_config(poly: SafetyPolytope) -> dict[str, Any]:
    """Everything needed to rebuild ``poly`` and to know what it was trained on."""
    return {
        **poly.meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "hidden_size": poly.hidden_size,
        "num_facets": poly.num_facets,
        "encoder": poly.encoder.spec.to_dict(),
        "facet_names": poly.facet_names,
    }


def save_polytope(poly: SafetyPolytope, directory: str | Path) -> None:
    """Write the artifact directory atomically (a temporary directory renamed into place)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in poly.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    config = polytope_config(poly)
    config["weights_sha256"] = sha256_file(tmp / WEIGHTS)
    write_json(tmp / CONFIG, config)
    with atomic_write(tmp / CARD) as fh:
        fh.write(model_card(config))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate an artifact's ``config.json``."""
    path = Path(directory) / CONFIG
    config = read_json(path, "config", hint="a polytope saved by sapguard")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise SapError(f"{path}: missing {', '.join(missing)}")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise SapError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} config")
    return config


def load_polytope(directory: str | Path) -> SafetyPolytope:
    """Rebuild a polytope from its directory, verifying the weights' checksum and shapes."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SapError(f"{weights}: not found")
    if sha256_file(weights) != config["weights_sha256"]:
        raise SapError(f"{weights}: checksum does not match config.json (truncated or modified)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise SapError(f"{weights}: unreadable safetensors ({err})") from None
    try:
        spec = EncoderSpec(**config["encoder"])
        meta = {k: v for k, v in config.items() if k not in ("encoder",)}
        poly = SafetyPolytope(int(config["hidden_size"]), int(config["num_facets"]), spec, meta=meta)
        poly.load_state_dict(tensors)
    except (TypeError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise SapError(f"{directory}: weights do not fit config.json ({first})") from None
    names = config.get("facet_names")
    if names is not None and (not isinstance(names, list) or len(names) != poly.num_facets):
        raise SapError(f"{directory / CONFIG}: facet_names must list {poly.num_facets} names")
    poly.eval()
    poly.requires_grad_(False)
    return poly


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


def model_card(config: dict[str, Any]) -> str:
    """A short human-readable card for the artifact directory."""
    base = config.get("base_model") or {}
    val = config.get("validation_metrics") or {}
    cal = config.get("calibration") or {}
    lines = [
        "---",
        "library_name: sapguard",
        f"base_model: {base.get('id', 'unknown')}",
        "tags: [safety, safety-polytope, sapguard]",
        "---",
        "",
        "# Safety polytope",
        "",
        f"A safety polytope (SaP) with {config['num_facets']} facets over layer {config.get('layer')} of "
        f"`{base.get('id', 'unknown')}` (hidden size {config['hidden_size']}), token policy "
        f"`{config.get('policy')}`, template `{config.get('template')}`.",
        "",
        f"Encoder: {config['encoder']}. Decision offset {cal.get('offset', 0):.4g}, calibrated on validation data "
        f"for a false-positive rate of {cal.get('target_fpr', 'n/a')}.",
        "",
        "## Facets",
        "",
        ", ".join(f"`{n}`" for n in config.get("facet_names", [])),
        "",
        "## Validation metrics (unsafe is the positive class)",
        "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(val.items())]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from sapguard import SafetyPolytope, scan",
        "poly = SafetyPolytope.from_pretrained('this/directory')",
        "print(scan(poly, ['How do I pick a lock?']))",
        "```",
        "",
        "Loading uses safetensors and JSON only; nothing is unpickled.",
        "",
    ]
    return "\n".join(lines)


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
