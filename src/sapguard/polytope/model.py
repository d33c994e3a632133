"""The safety polytope: a concept encoder, K facets and thresholds over one layer's hidden states.

    f = E(h)              concept encoder: standardise, then Linear -> ReLU (``depth`` times) or identity
    v = phi @ f - xi      per-facet violation; the state is safe iff every v_k <= 0

A decision offset calibrated on validation data shifts the verdict: a text is flagged unsafe when
``max_k v_k > offset``. Margins reported to users are ``v_k - offset``.

Also here: the batched reading loop (:func:`read_in_batches`) and the artifact format
(:func:`save_polytope` / :func:`load_polytope`, behind ``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sapguard._version import __version__
from sapguard.errors import SapError
from sapguard.io import atomic_write, read_json, sha256_file, write_json


@dataclass(frozen=True)
class EncoderSpec:
    """Shape of the concept encoder.

    Attributes:
        kind: ``"mlp"`` (Linear -> ReLU, repeated ``depth`` times; the paper's is depth 1) or
            ``"identity"`` (facets act on the standardised hidden state directly).
        width: Concept dimension F (paper: 16384).
        depth: Number of Linear -> ReLU layers.
    """

    kind: str = "mlp"
    width: int = 4096
    depth: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "identity"):
            raise SapError(f"unknown encoder kind {self.kind!r}; expected mlp or identity")
        if self.kind == "mlp" and (self.width < 1 or self.depth < 1):
            raise SapError("encoder width and depth must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConceptEncoder(nn.Module):
    """Standardise ``h`` with training statistics, then map it to concept features ``f``."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden_size: int, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        layers: list[nn.Module] = []
        width = hidden_size
        if spec.kind == "mlp":
            for _ in range(spec.depth):
                layers += [nn.Linear(width, spec.width), nn.ReLU()]
                width = spec.width
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., F]``."""
        return self.net((h - self.mean) / self.scale)


class SafetyPolytope(nn.Module):
    """``Q = {f : phi_k . f <= xi_k for every facet k}`` over a concept encoding of hidden states.

    Args:
        hidden_size: Width d of the base model's hidden states.
        num_facets: Number of facets K.
        encoder: Concept encoder spec.
        meta: Everything an artifact records besides weights (base model, layer, token policy,
            template, facet names, calibration, training summary...), written to the artifact's
            ``config.json`` by :func:`save_polytope`.

    Example:
        >>> poly = SafetyPolytope(576, 8, EncoderSpec(width=256))
        >>> poly(torch.zeros(2, 576)).shape
        torch.Size([2, 8])
    """

    offset: torch.Tensor

    def __init__(self, hidden_size: int, num_facets: int, encoder: EncoderSpec, meta: dict[str, Any] | None = None):
        super().__init__()
        if num_facets < 1:
            raise SapError("num_facets must be at least 1")
        self.hidden_size = hidden_size
        self.num_facets = num_facets
        self.encoder = ConceptEncoder(hidden_size, encoder)
        self.phi = nn.Parameter(torch.randn(num_facets, self.encoder.out_features) / self.encoder.out_features**0.5)
        self.xi = nn.Parameter(torch.zeros(num_facets))
        self.register_buffer("offset", torch.zeros(()))
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def facet_names(self) -> list[str]:
        names = self.meta.get("facet_names")
        return list(names) if names else [f"facet_{k}" for k in range(self.num_facets)]

    def concepts(self, h: torch.Tensor) -> torch.Tensor:
        """Concept features ``f = E(h)``, ``[..., F]``."""
        return self.encoder(h.to(self.phi.dtype))

    def violations_from_concepts(self, f: torch.Tensor) -> torch.Tensor:
        """``v = phi f - xi``, ``[..., K]``."""
        return f @ self.phi.T - self.xi

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Per-facet violations ``v`` of hidden states ``h`` (``[..., d] -> [..., K]``)."""
        return self.violations_from_concepts(self.concepts(h))

    def margins(self, h: torch.Tensor) -> torch.Tensor:
        """Violations minus the calibrated offset: positive means the facet fires."""
        return self(h) - self.offset

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Unsafety score: the largest margin, ``[...]``. Positive means unsafe."""
        return self.margins(h).max(dim=-1).values

    # Detection (``sapguard.detect.scan(poly, texts)``) and steering
    # (``sapguard.steer.steer(model, poly, mode)``) live in the layers above, which own them.
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the artifact directory; see :func:`save_polytope`."""
        save_polytope(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SafetyPolytope:
        """Load an artifact directory; see :func:`load_polytope`."""
        return load_polytope(directory)


BATCH_ROWS = 4096
"""Feature rows read in one pass by :func:`read_in_batches`."""


@torch.no_grad()
def read_in_batches(
    poly: SafetyPolytope, x: torch.Tensor, *, margins: bool = True, batch_size: int = BATCH_ROWS
) -> torch.Tensor:
    """Per-facet margins (or, with ``margins=False``, raw violations) of feature rows, batch by batch.

    The one loop that reads many feature rows through a polytope (training, calibration, facet
    analysis, detection): no gradients, each batch moved to the polytope's device, the result on
    the CPU.

    Args:
        poly: The polytope.
        x: Feature rows ``[n, d]``.
        margins: Subtract the calibrated offset (``v_k - offset``, positive fires) or not (``v_k``).
        batch_size: Rows per pass.

    Returns:
        ``[n, K]`` float tensor on the CPU.

    Example:
        >>> poly = SafetyPolytope(4, 2, EncoderSpec("identity"))
        >>> read_in_batches(poly, torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """
    device = poly.phi.device
    read = poly.margins if margins else poly
    out = [read(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, poly.num_facets), dtype=poly.phi.dtype)


# The artifact format, like a peft adapter: ``config.json`` + ``model.safetensors`` + ``README.md``.
# Loading never unpickles: weights come from safetensors, everything else from JSON, and the config
# records the weights' SHA-256. It lives beside the class so that save_pretrained/from_pretrained
# need nothing above this module; sapguard.polytope.artifact re-exports it next to the shipped
# default detector and the base-model compatibility check.

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
        f"`{config.get('policy')}`, template `{config.get('template')}`."
        + (f" Views read: {', '.join(config['views'])} (the tail view is the prompt's last line, at most "
           f"{config.get('tail_words', 64)} words, read alone; a text scores the larger margin)." if config.get("views") else ""),
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
