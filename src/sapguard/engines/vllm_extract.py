"""Feature extraction at engine speed: ``sap extract --engine vllm``.

Each record's token ids (the same :func:`sapguard.features.extract.encode_records` encoding as the
transformers path: template, response appended, truncation to ``max_length``) are sent to vLLM as
a prompt with one generated token; the forward hook keeps the residual-stream rows at the layer
and the rows the token policy reads are returned. vLLM schedules the whole list with continuous
batching (no padding). The features directory has the transformers path's format (one shard,
``manifest.json`` with ``"engine": "vllm"``), so ``sap train`` and ``sap eval`` read it unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from sapguard.data.records import Record
from sapguard.engines.flat import features_from_json
from sapguard.engines.vllm import VLLMGuard
from sapguard.features.extract import data_checksum, encode_records, open_store, write_manifest, write_shard
from sapguard.features.policies import POOLED, check_policy
from sapguard.features.store import FORMAT_VERSION, FeatureSet, load_features
from sapguard.models.chat import resolve_template
from sapguard.models.layers import resolve_layer

logger = logging.getLogger(__name__)


def extract_with_vllm(
    llm: Any,
    records: Sequence[Record],
    layer: int,
    *,
    policy: str = "last_prompt",
    template: str = "auto",
    max_length: int = 1024,
    chunk: int = 256,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states of ``records`` at ``layer`` read inside vLLM; the same return as
    :func:`sapguard.features.extract.extract_features`: ``(features, record_index, position)``.

    Args:
        llm: A vLLM ``LLM`` built by :func:`sapguard.engines.vllm.build_llm`.
        chunk: Records sent to the engine per call (bounds the captured rows held in memory).
    """
    check_policy(policy)
    guard = VLLMGuard(llm, "none", layer=layer, record_tokens=False)
    try:
        template = resolve_template(guard.tokenizer, template)
        shim: Any = SimpleNamespace(tokenizer=guard.tokenizer)  # encode_records reads only the tokenizer
        encoded = encode_records(shim, records, policy, template, max_length)
        params = guard.sampling_params(max_tokens=1, temperature=0.0)
        feats, index, pos = [], [], []
        bar = tqdm(total=len(encoded), desc="extract (vllm)", unit="text", disable=not show_progress)
        for start in range(0, len(encoded), chunk):
            part = encoded[start : start + chunk]
            only_last = all(e.positions == [len(e.ids) - 1] for e in part)
            capture = "last_prompt" if only_last else "prompt"
            batch_params = guard.sampling_params(params, mode="detect", capture=capture)
            outputs = llm.generate([{"prompt_token_ids": e.ids} for e in part], batch_params, use_tqdm=False)
            records_out = llm.collective_rpc(
                "sapguard_results", args=([o.request_id for o in outputs], True)
            )[0]
            for item, out in zip(part, outputs):
                positions, rows = features_from_json(records_out[out.request_id]["features"])
                by_pos = dict(zip(positions, rows))
                chosen = torch.stack([by_pos[p] for p in item.positions])
                if policy in POOLED:
                    feats.append(chosen.mean(0, keepdim=True))
                    index.append(item.record_index)
                    pos.append(item.positions[-1])
                else:
                    feats.append(chosen)
                    index += [item.record_index] * len(item.positions)
                    pos += item.positions
            bar.update(len(part))
        bar.close()
    finally:
        guard.detach()
    features = torch.cat(feats) if feats else torch.zeros(0, guard.identity["hidden_size"])
    record_index = torch.tensor(index, dtype=torch.long)
    position = torch.tensor(pos, dtype=torch.long)
    order = torch.argsort(record_index * (max_length + 1) + position, stable=True)
    return features[order], record_index[order], position[order]


def extract_to_dir_with_vllm(
    llm: Any,
    records: Sequence[Record],
    out_dir: str | Path,
    layer: int,
    *,
    policy: str = "last_prompt",
    template: str = "auto",
    max_length: int = 1024,
    show_progress: bool = False,
) -> FeatureSet:
    """A features directory like :func:`sapguard.features.extract.extract_to_dir`'s, read in vLLM.

    A complete directory written with the same settings is returned as is; one made with other
    settings is refused; an incomplete one is extracted again (no partial resume on this path).
    """
    from sapguard.engines.vllm import engine_identity

    out = Path(out_dir)
    model_config = llm.llm_engine.model_config
    hf = model_config.hf_config.get_text_config()
    identity = engine_identity(str(model_config.model), int(hf.hidden_size), int(hf.num_hidden_layers))
    layer = resolve_layer(layer, identity["num_layers"])
    tokenizer = llm.get_tokenizer()
    template = resolve_template(tokenizer, template)
    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {"id": identity["id"], "revision": _revision(str(model_config.model))},
        "hidden_size": identity["hidden_size"],
        "num_layers": identity["num_layers"],
        "layer": layer,
        "policy": policy,
        "template": template,
        "max_length": max_length,
        "shard_records": len(records),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "storage_dtype": "float32",
        "data_sha256": data_checksum(records),
        "n_records": len(records),
        "engine": "vllm",
    }
    if open_store(out, settings, records)[1]:
        return load_features(out)
    feats, index, pos = extract_with_vllm(
        llm,
        records,
        layer,
        policy=policy,
        template=template,
        max_length=max_length,
        show_progress=show_progress,
    )
    write_manifest(
        out, settings, [write_shard(out, 0, feats, index.tolist(), pos.tolist(), len(records))], True
    )
    return load_features(out)


def _revision(model: str) -> str | None:
    """The default model's revision as :func:`sapguard.models.loading.load_model` records it."""
    source = Path(model) / "sapguard-source.json"
    if source.is_file():
        info = json.loads(source.read_text())
        return f"sha256:{info['gguf_sha256']}"
    return None


ENGINES = ("transformers", "vllm")


def check_engine(engine: str) -> str:
    """``transformers`` or ``vllm``; ``vllm`` also needs vLLM importable (its own environment)."""
    from sapguard.errors import SapError

    if engine not in ENGINES:
        raise SapError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    return engine


def extract_to_dir_cli(
    model: str,
    records: Sequence[Record],
    out: str | Path,
    layer: int,
    *,
    policy: str,
    template: str,
    max_length: int,
) -> FeatureSet:
    """``sap extract --engine vllm``: start an engine on ``model`` and extract into ``out``."""
    import os

    from sapguard.engines.vllm import build_llm

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = build_llm(model, max_model_len=max(max_length + 8, 512))
    return extract_to_dir_with_vllm(
        llm, records, out, layer, policy=policy, template=template, max_length=max_length, show_progress=True
    )
