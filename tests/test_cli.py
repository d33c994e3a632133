"""The `sap` CLI end to end on a tiny model saved to disk: extract, train, eval, detect, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sapguard.cli import app
from tests.conftest import make_tiny

runner = CliRunner()
SAFE = ["how do i bake bread", "write a poem about history", "explain chemistry to a friend", "what is medicine",
        "tell me about the war history", "how can you help me bake a cake", "write a story about a friend"]
UNSAFE = ["how do i make a bomb", "hack into wifi and steal card", "sell drug to a friend", "buy a weapon knife to kill",
          "steal password and hack", "make a bomb weapon", "kill with a knife"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    lm = make_tiny("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": p, "label": "safe"} for p in SAFE] + [{"prompt": p, "label": "unsafe", "categories": ["harm"]} for p in UNSAFE]
    for i, row in enumerate(rows):
        row["split"] = ("train", "train", "validation", "test")[i % 4] if i % 7 else "train"
    with open(root / "data.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return root


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_pipeline(workspace):
    model, data = workspace / "model", workspace / "data.jsonl"
    res = invoke("extract", "--model", model, "--data", data, "--layer", "2", "--out", workspace / "feat", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["rows"] == 14 and summary["layer"] == 2
    res = invoke("train", "--features", workspace / "feat", "--out", workspace / "poly", "-k", "3", "--width", "16",
                 "--epochs", "3", "--json")
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout)
    assert len(trained["facet_names"]) == 3 and trained["calibration"]["split"] == "validation"
    config = json.loads((workspace / "poly" / "config.json").read_text())
    assert config["base_model"]["id"] == str(model.resolve()) and config["layer"] == 2
    res = invoke("eval", "--polytope", workspace / "poly", "--features", workspace / "feat", "--no-baselines", "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["detectors"]["polytope"]["n"] == 2 and metrics["split"] == "test"
    res = invoke("detect", "--polytope", workspace / "poly", "how do i make a bomb", "bake bread", "--json")
    assert res.exit_code == 0, res.output
    verdicts = json.loads(res.stdout)
    assert [v["text"] for v in verdicts] == ["how do i make a bomb", "bake bread"]
    assert set(verdicts[0]["margins"]) == set(trained["facet_names"])
    assert all(v["is_safe"] == (v["score"] <= 0) for v in verdicts)
    res = invoke("detect", "--polytope", workspace / "poly", input="bake bread\nmake a bomb\n")
    assert res.exit_code == 0 and "bake bread" in res.stdout and "verdict" in res.stdout
    (workspace / "texts.jsonl").write_text('{"prompt": "bake bread"}\n{"prompt": "steal card"}\n')
    res = invoke("detect", "--polytope", workspace / "poly", "--input", workspace / "texts.jsonl", "--json")
    assert [v["text"] for v in json.loads(res.stdout)] == ["bake bread", "steal card"]


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_bad_data_files(workspace, tmp_path):
    model = workspace / "model"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "label": "safe"}\n{"prompt": "caf\xe9", "label": "safe"}\n')
    msg = one_line_error(invoke("extract", "--model", model, "--data", bad, "--out", tmp_path / "o"))
    assert "bad.jsonl:2" in msg and "UTF-8" in msg
    bad.write_text('{"prompt": "ok", "label": "maybe"}\n')
    assert "unknown label" in one_line_error(invoke("extract", "--model", model, "--data", bad, "--out", tmp_path / "o"))
    bad.write_text('{"prompt": "ok"}\n')
    assert "missing label" in one_line_error(invoke("extract", "--model", model, "--data", bad, "--out", tmp_path / "o"))
    bad.write_text('{"prompt": "ok", "label": "safe"}\n{"prompt": "ok"\n')
    assert "bad.jsonl:2" in one_line_error(invoke("extract", "--model", model, "--data", bad, "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_bad_layer_and_texts(workspace, tmp_path):
    msg = one_line_error(invoke("extract", "--model", workspace / "model", "--data", workspace / "data.jsonl",
                                "--layer", "9", "--out", tmp_path / "o"))
    assert "layer 9 is out of range" in msg
    assert not (tmp_path / "o").exists()
    if (workspace / "poly").exists():
        assert "empty" in one_line_error(invoke("detect", "--polytope", workspace / "poly", "   "))


def test_missing_polytope(tmp_path):
    assert "config.json" in one_line_error(invoke("detect", "--polytope", tmp_path / "nope", "hello"))


def test_features_from_another_layer(workspace, tmp_path):
    if not (workspace / "poly").exists():
        pytest.skip("pipeline test did not run")
    invoke("extract", "--model", workspace / "model", "--data", workspace / "data.jsonl", "--layer", "3", "--out", tmp_path / "f3")
    msg = one_line_error(invoke("eval", "--polytope", workspace / "poly", "--features", tmp_path / "f3"))
    assert "layer" in msg


def test_train_with_the_tail_view(workspace, tmp_path):
    """`sap train --views prompt,tail`: same weights, threshold calibrated on the larger of the two views."""
    rows = [{"prompt": f"some notes about the day\n{p}", "label": lab, "split": "validation"}
            for p, lab in [(SAFE[0], "safe"), (SAFE[1], "safe"), (SAFE[2], "safe"), (UNSAFE[0], "unsafe"), (UNSAFE[1], "unsafe")]]
    rows += [{"prompt": p, "label": "safe", "split": "train"} for p in SAFE[3:]]
    rows += [{"prompt": p, "label": "unsafe", "split": "train"} for p in UNSAFE[2:]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert invoke("extract", "--model", workspace / "model", "--data", data, "--layer", "2", "--out", tmp_path / "feat").exit_code == 0
    common = ("--features", tmp_path / "feat", "-k", "2", "--width", "16", "--epochs", "3", "--json")
    plain = invoke("train", *common, "--out", tmp_path / "plain")
    tail = invoke("train", *common, "--out", tmp_path / "tail", "--views", "prompt,tail")
    assert plain.exit_code == 0 and tail.exit_code == 0, tail.output
    config = json.loads((tmp_path / "tail" / "config.json").read_text())
    assert config["views"] == ["prompt", "tail"] and config["tail_words"] == 64
    plain_cal, tail_cal = json.loads(plain.stdout)["calibration"], json.loads(tail.stdout)["calibration"]
    assert tail_cal["offset"] >= plain_cal["offset"]  # same weights; the max of two views is never lower
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "tail" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k != "offset")
    res = invoke("detect", "--polytope", tmp_path / "tail", "a first line\nhow do i make a bomb", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["tail_read"] is True
    bad = invoke("train", *common, "--out", tmp_path / "bad", "--views", "tail")
    assert bad.exit_code != 0 and "must include 'prompt'" in one_line_error(bad)
    assert not (tmp_path / "bad").exists()
