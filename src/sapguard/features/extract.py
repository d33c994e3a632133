"""Feature extraction: batched, length-sorted, left-padded forward passes read through a hook.

Never a copy of the model's forward: a forward hook on the decoder block for the layer captures
its output, and the pass stops there. Rows are read at the last *real* token under left padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sapguard.data.records import Record, write_jsonl
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.features.hooks import LayerReader, left_pad
from sapguard.features.policies import POOLED, check_policy, read_positions
from sapguard.features.store import FORMAT_VERSION, MANIFEST, RECORDS, FeatureSet, load_features
from sapguard.io import atomic_tmp_path, sha256_file, write_json
from sapguard.models.chat import encode_pair, header_length, resolve_template
from sapguard.models.layers import find_decoder_blocks, resolve_layer
from sapguard.models.loading import LoadedModel

logger = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 16384
"""Upper bound on padded tokens per forward pass (batch size x longest sequence)."""


@dataclass(frozen=True)
class Encoded:
    """One record as token ids and the positions to read."""

    record_index: int
    ids: list[int]
    positions: list[int]


def encode_records(
    lm: LoadedModel, records: Sequence[Record], policy: str, template: str, max_length: int
) -> list[Encoded]:
    """Tokenise records (a chat history as earlier turns) under the template; keep the last
    ``max_length`` tokens of long ones."""
    out, truncated = [], 0
    header = header_length(lm.tokenizer, template) if policy in POOLED else 0
    for i, record in enumerate(records):
        if not record.prompt.strip():
            raise SapError(f"record {i + 1}: empty or whitespace-only prompt")
        ids, n_prompt = encode_pair(lm.tokenizer, record.prompt, record.response, template, record.history)
        positions = read_positions(policy, len(ids), n_prompt, header)
        if len(ids) > max_length:
            cut = len(ids) - max_length
            ids = ids[cut:]
            positions = [p - cut for p in positions if p >= cut]
            truncated += 1
        if positions:
            out.append(Encoded(i, ids, positions))
    if truncated:
        logger.warning("%d of %d texts were longer than %d tokens; kept their last tokens", truncated, len(records), max_length)
    return out


def length_sorted_batches(encoded: list[Encoded], batch_size: int, max_batch_tokens: int) -> list[list[Encoded]]:
    """Group sequences of similar length (longest first) so padding is small; deterministic."""
    order = sorted(encoded, key=lambda e: (-len(e.ids), e.record_index))
    batches: list[list[Encoded]] = []
    current: list[Encoded] = []
    for item in order:
        width = len(current[0].ids) if current else len(item.ids)
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def run_batch(
    reader: LayerReader, lm: LoadedModel, batch: list[Encoded], pooled: bool = False
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Forward one batch; return feature rows (float32, CPU), their record indices and positions.

    With ``pooled`` each text's positions are averaged into one row (read at its last position).
    """
    inputs = left_pad([e.ids for e in batch], lm.tokenizer.pad_token_id, lm.device)
    hidden = reader.run(**inputs)
    width = inputs["input_ids"].shape[1]
    if pooled:
        rows = [hidden[b, [width - len(e.ids) + p for p in e.positions]].float().mean(0) for b, e in enumerate(batch)]
        feats = torch.stack(rows).cpu()
        index = [e.record_index for e in batch]
        positions = [e.positions[-1] for e in batch]
        if not torch.isfinite(feats).all():
            raise SapError("the model produced NaN or Inf hidden states; try --dtype float32")
        return feats, index, positions
    rows_b, rows_t, index, positions = [], [], [], []
    for b, item in enumerate(batch):
        offset = width - len(item.ids)
        for p in item.positions:
            rows_b.append(b)
            rows_t.append(offset + p)
            index.append(item.record_index)
            positions.append(p)
    feats = hidden[torch.tensor(rows_b), torch.tensor(rows_t)].float().cpu()
    if not torch.isfinite(feats).all():
        raise SapError("the model produced NaN or Inf hidden states; try --dtype float32")
    return feats, index, positions


def read_batches(
    reader: LayerReader, lm: LoadedModel, batches: Sequence[list[Encoded]], policy: str, bar: Any = None
) -> tuple[torch.Tensor, list[int], list[int]]:
    """The extraction loop: run every batch, concatenate the rows; ``bar`` (tqdm) counts texts.

    Returns:
        ``(features [rows, d] float32, record index per row, position per row)`` in batch order.
    """
    feats, index, pos = [], [], []
    for batch in batches:
        f, i, p = run_batch(reader, lm, batch, policy in POOLED)
        feats.append(f)
        index.extend(i)
        pos.extend(p)
        if bar is not None:
            bar.update(len(batch))
    return (torch.cat(feats) if feats else torch.zeros(0, lm.hidden_size)), index, pos


def extract_features(
    lm: LoadedModel,
    records: Sequence[Record],
    layer: int,
    *,
    policy: str = "last_prompt",
    template: str = "auto",
    batch_size: int = 32,
    max_length: int = 1024,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states of ``records`` at ``layer``, in memory.

    Args:
        lm: The loaded base model.
        records: Texts to read (labels are not used here).
        layer: Layer number (see :mod:`sapguard.models.layers`; negative allowed).
        policy: Token policy (:data:`sapguard.features.policies.POLICIES`).
        template: ``"auto"``, ``"chat"`` or ``"none"`` (:mod:`sapguard.models.chat`).

    Returns:
        ``(features [rows, d] float32, record_index [rows], position [rows])`` in input order.
    """
    check_policy(policy)
    layer = resolve_layer(layer, len(find_decoder_blocks(lm.model)))
    template = resolve_template(lm.tokenizer, template)
    encoded = encode_records(lm, records, policy, template, max_length)
    batches = length_sorted_batches(encoded, batch_size, max_batch_tokens)
    with (
        LayerReader(lm.model, layer, stop=True) as reader,
        tqdm(total=len(encoded), desc="extract", unit="text", disable=not show_progress) as bar,
    ):
        features, index, pos = read_batches(reader, lm, batches, policy, bar)
    record_index = torch.tensor(index, dtype=torch.long)
    position = torch.tensor(pos, dtype=torch.long)
    order = torch.argsort(record_index * (max_length + 1) + position, stable=True)
    return features[order], record_index[order], position[order]


def data_checksum(records: Sequence[Record]) -> str:
    """Checksum of the records' content, labels and splits (what a manifest pins)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def store_settings(
    lm: LoadedModel, records: Sequence[Record], layer: int, policy: str, template: str, max_length: int, shard_records: int
) -> dict[str, Any]:
    """What a features manifest pins (``layer`` and ``template`` already resolved)."""
    identity = lm.identity()
    return {
        "format_version": FORMAT_VERSION,
        "model": {"id": identity["id"], "revision": identity["revision"]},
        "hidden_size": identity["hidden_size"],
        "num_layers": identity["num_layers"],
        "layer": layer,
        "policy": policy,
        "template": template,
        "max_length": max_length,
        "shard_records": shard_records,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "storage_dtype": "float32",
        "data_sha256": data_checksum(records),
        "n_records": len(records),
    }


def open_store(out: Path, settings: dict[str, Any], records: Sequence[Record]) -> tuple[list[dict[str, Any]], bool]:
    """Open a features directory for writing: ``(complete shards so far, whether it is complete)``.

    A new directory gets the records; one made with other settings is refused.
    """
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / RECORDS, records)
        return [], False
    previous = json.loads(manifest_path.read_text(encoding="utf-8"))
    for key, value in settings.items():
        if previous.get(key) != value:
            raise ArtifactMismatchError(
                f"{out}: holds features made with {key}={previous.get(key)!r}, not {value!r}; use another --out"
            )
    if previous.get("complete"):
        return previous["shards"], True
    shards = [s for s in previous["shards"] if (out / s["file"]).is_file() and sha256_file(out / s["file"]) == s["sha256"]]
    logger.info("resuming %s after %d complete shards", out, len(shards))
    return shards, False


def write_manifest(out: Path, settings: dict[str, Any], shards: list[dict[str, Any]], complete: bool) -> None:
    """Write the manifest listing the complete ``shards`` (atomically)."""
    rows = sum(s["rows"] for s in shards)
    write_json(out / MANIFEST, {**settings, "shards": shards, "rows": rows, "complete": complete})


def plan_shards(
    lm: LoadedModel, records: Sequence[Record], policy: str, template: str, max_length: int, shard_records: int, batch_size: int
) -> list[list[list[Encoded]]]:
    """The batches of every shard: shards hold fixed chunks of records in a deterministic length
    order (resuming skips whole chunks), each chunk cut into length-sorted batches."""
    encoded = encode_records(lm, records, policy, template, max_length)
    encoded.sort(key=lambda e: (-len(e.ids), e.record_index))
    chunks = [encoded[i : i + shard_records] for i in range(0, len(encoded), shard_records)]
    return [length_sorted_batches(chunk, batch_size, MAX_BATCH_TOKENS) for chunk in chunks]


def write_shard(out: Path, number: int, feats: torch.Tensor, index: list[int], pos: list[int], records: int) -> dict[str, Any]:
    """Write shard ``number`` atomically; return its manifest entry."""
    name = f"shard-{number:05d}.safetensors"
    tmp = atomic_tmp_path(out / name)
    save_file(
        {
            "features": feats.contiguous(),
            "record_index": torch.tensor(index, dtype=torch.long),
            "position": torch.tensor(pos, dtype=torch.long),
        },
        str(tmp),
    )
    tmp.replace(out / name)
    return {"file": name, "rows": len(index), "records": records, "sha256": sha256_file(out / name)}


def extract_to_dir(
    lm: LoadedModel,
    records: Sequence[Record],
    out_dir: str | Path,
    layer: int,
    *,
    policy: str = "last_prompt",
    template: str = "auto",
    batch_size: int = 32,
    max_length: int = 1024,
    shard_records: int = 512,
    show_progress: bool = False,
) -> FeatureSet:
    """Extract features into a directory of shards (resumable), then load and return them.

    A second call with the same arguments on a partly written directory continues after the last
    complete shard. A directory made for another model, layer, policy, template or data is refused.
    On several processes (``torchrun``): :func:`sapguard.features.parallel.extract_to_dir_distributed`.
    """
    check_policy(policy)
    out = Path(out_dir)
    layer = resolve_layer(layer, len(find_decoder_blocks(lm.model)))
    template = resolve_template(lm.tokenizer, template)
    settings = store_settings(lm, records, layer, policy, template, max_length, shard_records)
    shards, complete = open_store(out, settings, records)
    if complete:
        return load_features(out)
    write_manifest(out, settings, shards, False)
    plan = plan_shards(lm, records, policy, template, max_length, shard_records, batch_size)
    sizes = [sum(len(b) for b in batches) for batches in plan]
    bar = tqdm(total=sum(sizes), initial=sum(sizes[: len(shards)]), desc="extract", unit="text", disable=not show_progress)
    with LayerReader(lm.model, layer, stop=True) as reader:
        for number in range(len(shards), len(plan)):
            feats, index, pos = read_batches(reader, lm, plan[number], policy, bar)
            shards.append(write_shard(out, number, feats, index, pos, sizes[number]))
            write_manifest(out, settings, shards, False)
    bar.close()
    write_manifest(out, settings, shards, True)
    return load_features(out)
