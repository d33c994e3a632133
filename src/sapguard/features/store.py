"""Feature directories: sharded safetensors, the records they came from, and a JSON manifest.

Layout::

    features/
      manifest.json          # model, layer, policy, template, dtype, rows, data checksum, shards
      records.jsonl          # the labelled records (with splits); rows point into it
      shard-00000.safetensors  # "features" [rows, d] float32, "record_index" [rows], "position" [rows]

Shards are written atomically and listed in the manifest only once complete, so a killed run
resumes from the last complete shard without duplicate or lost rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sapguard.data.records import Record, record_from_mapping
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.io import read_json, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check a features manifest."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "manifest", hint="a features directory made by `sap extract`")
    for key in ("format_version", "model", "layer", "policy", "template", "shards", "complete", "hidden_size"):
        if key not in manifest:
            raise SapError(f"{path}: manifest lacks {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise SapError(f"{path}: unsupported format_version {manifest['format_version']}")
    return manifest


@dataclass
class FeatureSet:
    """Feature rows with their records.

    Attributes:
        features: ``[rows, hidden_size]`` float32 hidden states.
        record_index: ``[rows]`` index into ``records`` for each row.
        position: ``[rows]`` token position (in the unpadded sequence) each row was read at.
        records: The labelled records.
        manifest: The manifest the set was loaded from.
    """

    features: torch.Tensor
    record_index: torch.Tensor
    position: torch.Tensor
    records: list[Record]
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """1 for unsafe rows (the positive class), 0 for safe."""
        unsafe = np.array([not r.is_safe for r in self.records], dtype=np.int64)
        return unsafe[self.record_index.numpy()]

    def rows(self, split: str) -> np.ndarray:
        """Row indices whose record is in ``split``."""
        in_split = np.array([r.split == split for r in self.records], dtype=bool)
        return np.nonzero(in_split[self.record_index.numpy()])[0]

    def subset(self, split: str) -> tuple[torch.Tensor, np.ndarray, list[Record]]:
        """``(features, labels, records)`` of one split, row-aligned."""
        rows = self.rows(split)
        if len(rows) == 0:
            raise SapError(f"features have no rows in split {split!r}")
        index = self.record_index.numpy()[rows]
        return self.features[rows], self.labels[rows], [self.records[i] for i in index]


def load_features(directory: str | Path, *, expect: dict[str, Any] | None = None) -> FeatureSet:
    """Load a complete features directory, verifying shard checksums.

    Args:
        directory: Written by :func:`sapguard.features.extract.extract_to_dir`.
        expect: Manifest values that must match (e.g. ``{"layer": 20}``), else ArtifactMismatchError.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["complete"]:
        raise SapError(f"{directory}: extraction is incomplete; rerun `sap extract` with the same --out to resume")
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            raise ArtifactMismatchError(
                f"{directory}: features were made with {key}={manifest.get(key)!r}, expected {value!r}"
            )
    records = read_records_file(directory / RECORDS)
    feats, index, pos = [], [], []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise SapError(f"{path}: shard listed in the manifest is missing")
        if sha256_file(path) != shard["sha256"]:
            raise SapError(f"{path}: checksum mismatch (truncated or modified); re-extract")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise SapError(f"{path}: unreadable safetensors ({err})") from None
        feats.append(tensors["features"])
        index.append(tensors["record_index"])
        pos.append(tensors["position"])
    if not feats:
        raise SapError(f"{directory}: no feature rows")
    features = torch.cat(feats)
    if not torch.isfinite(features).all():
        raise SapError(f"{directory}: features contain NaN or Inf")
    record_index = torch.cat(index)
    if int(record_index.max()) >= len(records):
        raise SapError(f"{directory}: shards point past the end of {RECORDS}")
    return FeatureSet(features, record_index, torch.cat(pos), records, manifest)


def read_records_file(path: Path) -> list[Record]:
    """Read the records stored beside the shards (strict: every line must parse)."""
    if not path.is_file():
        raise SapError(f"{path}: not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SapError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        records.append(record_from_mapping(row, f"{path}:{number}", default_source="user"))
    return records
