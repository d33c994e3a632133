"""`sap extract --engine vllm` and `sap detect --engine vllm`, each in its own process (an engine per
process: vLLM's parallel state is process-global, so a second in-process engine would tear down the
session's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sapguard.features.store import load_features

from .conftest import PROMPTS

SAP = str(Path(sys.executable).with_name("sap"))


def _sap(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.run([SAP, *args], env=env, capture_output=True, text=True, timeout=400)


def test_extract_and_detect_with_the_vllm_engine(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "is_safe": i % 2 == 0}) + "\n" for i, p in enumerate(PROMPTS)))
    from sapguard.polytope.artifact import default_polytope

    poly = default_polytope()
    out = tmp_path / "feats"
    layer = str(poly.meta["layer"])
    res = _sap("extract", "--engine", "vllm", "--data", str(data), "--out", str(out), "--layer", layer, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    fs = load_features(out)
    assert fs.features.shape == (len(PROMPTS), 576) and fs.manifest["engine"] == "vllm"
    assert torch.isfinite(fs.features).all()
    res = _sap("detect", "--engine", "vllm", "--json", *PROMPTS)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout
    start = 0 if text.startswith("[\n") else text.rindex("\n[\n") + 1  # vLLM may log to stdout too
    verdicts, _ = json.JSONDecoder().raw_decode(text, start)
    scores = poly.score(fs.features).tolist()
    assert [v["score"] for v in verdicts] == pytest.approx(scores, abs=1e-3)
    assert [v["is_safe"] for v in verdicts] == [s <= 0 for s in scores]


def test_unknown_engine():
    res = _sap("detect", "--engine", "sglang", "hi")
    assert res.returncode != 0 and "unknown engine 'sglang'" in res.stderr + res.stdout
