"""Feature directories: manifest, resume without duplicate or lost rows, mismatch and tamper checks."""

from __future__ import annotations

import json

import pytest
import torch

from sapguard.data.records import Record
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.features import extract as extract_mod
from sapguard.features.extract import extract_features, extract_to_dir
from sapguard.features.store import load_features

WORDS = "how do i make a bomb bake bread cake hack into wifi steal card write poem story".split()


def records(n: int = 23) -> list[Record]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 6)]
        out.append(Record(" ".join(words), None, i % 2 == 0, split=("train", "validation", "test")[i % 3]))
    return out


def test_manifest_and_rows(tiny_llama, tmp_path):
    fs = extract_to_dir(tiny_llama, records(), tmp_path / "f", 2, shard_records=5, batch_size=4)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 23 and manifest["layer"] == 2
    assert manifest["model"] == {"id": "tiny-llama", "revision": "test"} and manifest["hidden_size"] == 32
    assert len(manifest["shards"]) == 5
    assert sorted(fs.record_index.tolist()) == list(range(23))
    direct, index, _ = extract_features(tiny_llama, records(), 2)
    order = torch.argsort(fs.record_index)
    assert torch.allclose(fs.features[order], direct[torch.argsort(index)], atol=1e-5)
    x, y, recs = fs.subset("train")
    assert len(x) == len(y) == len(recs) == 8
    assert all(r.split == "train" for r in recs)
    assert list(y) == [0 if r.is_safe else 1 for r in recs]


def test_killed_run_resumes_without_duplicates(tiny_llama, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = extract_mod.run_batch

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "run_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_to_dir(tiny_llama, records(), tmp_path / "f", 2, shard_records=5, batch_size=2)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < len(manifest["shards"]) < 5
    with pytest.raises(SapError, match="incomplete"):
        load_features(tmp_path / "f")
    monkeypatch.setattr(extract_mod, "run_batch", original)
    fs = extract_to_dir(tiny_llama, records(), tmp_path / "f", 2, shard_records=5, batch_size=2)
    assert sorted(fs.record_index.tolist()) == list(range(23))
    assert not list((tmp_path / "f").glob("*.tmp"))


def test_directory_from_another_layer_or_model_is_refused(tiny_llama, tmp_path):
    extract_to_dir(tiny_llama, records(), tmp_path / "f", 2)
    with pytest.raises(ArtifactMismatchError, match="layer"):
        extract_to_dir(tiny_llama, records(), tmp_path / "f", 3)
    with pytest.raises(ArtifactMismatchError, match="layer"):
        load_features(tmp_path / "f", expect={"layer": 3})


def test_tampered_shard_is_refused(tiny_llama, tmp_path):
    extract_to_dir(tiny_llama, records(), tmp_path / "f", 2)
    shard = next((tmp_path / "f").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(SapError, match="checksum"):
        load_features(tmp_path / "f")


def test_empty_prompt_is_refused(tiny_llama):
    with pytest.raises(SapError, match="empty"):
        extract_features(tiny_llama, [Record("  ", None, True)], 1)


def test_not_a_features_directory(tmp_path):
    with pytest.raises(SapError, match=r"manifest\.json"):
        load_features(tmp_path)


def test_nan_features_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from sapguard.io import sha256_file

    extract_to_dir(tiny_llama, records(), tmp_path / "f", 2)
    manifest_path = tmp_path / "f" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = tmp_path / "f" / manifest["shards"][0]["file"]
    tensors = load_file(str(shard))
    tensors["features"][0, 0] = float("nan")
    save_file(tensors, str(shard))
    manifest["shards"][0]["sha256"] = sha256_file(shard)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SapError, match="NaN"):
        load_features(tmp_path / "f")
