"""`sap generate` and `sap chat` on a tiny model saved to disk (offline)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sapguard.cli import app
from tests.conftest import make_tiny
from tests.steer_fixtures import ALWAYS, tiny_polytope


@pytest.fixture
def saved(tmp_path):
    lm = make_tiny("llama")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    poly = tiny_polytope(lm, offset=ALWAYS)
    poly.meta["base_model"] = dict(poly.meta["base_model"], id=str(model_dir.resolve()))
    poly.save_pretrained(tmp_path / "poly")
    return tmp_path


def test_generate_json_with_trace(saved):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--polytope",
            str(saved / "poly"),
            "--mode",
            "redirect",
            "--alpha",
            "2",
            "-n",
            "4",
            "--json",
            "--trace",
            "how do i make a bomb",
            "bake bread",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["prompt"] for r in out] == ["how do i make a bomb", "bake bread"]
    assert out[0]["summary"]["edited_tokens"] == len(out[0]["trace"]) > 0
    assert {"margins", "edited", "edit_norm", "steps"} <= set(out[0]["trace"][0])


def test_generate_input_file_refuse_and_table(saved):
    prompts = saved / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "steal card"}) + "\n")
    result = CliRunner().invoke(
        app,
        ["generate", "-p", str(saved / "poly"), "--mode", "refuse", "-i", str(prompts), "-n", "3", "--trace"],
    )
    assert result.exit_code == 0, result.output
    assert "I can't help with that request." in result.stdout and "(refused)" in result.stdout


def test_generate_errors_are_one_line(saved):
    runner = CliRunner()
    bad = runner.invoke(app, ["generate", "-p", str(saved / "poly"), "--mode", "warp", "hi"])
    assert bad.exit_code == 2 and "unknown steering mode" in bad.output
    empty = runner.invoke(app, ["generate", "-p", str(saved / "poly"), "   "])
    assert empty.exit_code == 2 and "error:" in empty.output
    gcg = runner.invoke(app, ["bench", "-p", str(saved / "poly"), "--gcg-suffixes", "mine", "--out", str(saved / "b")])
    assert gcg.exit_code == 2 and "unknown gcg_suffixes 'mine'" in gcg.output and not (saved / "b").exists()


def test_chat_switches_mode_and_quits(saved):
    result = CliRunner().invoke(
        app, ["chat", "-p", str(saved / "poly"), "-n", "3"], input="bake bread\n/mode detect\nbake bread\n\n"
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("bot>") == 2 and "mode: detect" in result.output


def test_steer_train_writes_gate_and_target(saved, monkeypatch):
    from sapguard.data import attacks, default_corpus
    from tests.test_steer_target import _corpus

    monkeypatch.setattr(default_corpus, "build_default_corpus", _corpus)
    monkeypatch.setattr(attacks, "family_attacks", lambda family, n=24: list(attacks.HANDWRITTEN))
    out = saved / "steer-art"
    args = ["steer-train", "-o", str(out), "--layer", "2", "--model", str(saved / "model"), "--first-n", "2"]
    args += [
        "--n-harmful",
        "6",
        "--n-wrapped",
        "3",
        "--n-benign",
        "6",
        "--n-gate",
        "12",
        "--n-gate-wrapped",
        "6",
    ]
    args += ["--steer-first-n", "2", "--margin", "1.5", "--basis", "none", "--redirect-alpha", "0.5"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["layer"] == 2 and summary["target_facets"] >= 1
    from sapguard.steer.artifact import load_steering, target_of

    gate = load_steering(out)
    assert target_of(gate) is not None and gate.meta["steering"]["hook"]["first_n"] == 2
    assert len(gate.meta["steering"]["direction"]) == 32
    defaults = gate.meta["steering"]["defaults"]
    assert defaults["safeflow"] == {"margin": 1.5, "max_steps": 50, "basis": None}
    assert defaults["redirect"] == {"alpha": 0.5}
