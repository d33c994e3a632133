"""The general plugin: a plain `vllm.LLM` (engine core in its own process, as under `vllm serve`)
gets the hook from the environment alone; results and modes cross the process boundary as plain data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sapguard.polytope.model import EncoderSpec, SafetyPolytope

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from sapguard.models.loading import fetch_default_model
from sapguard.models.chat import encode_prompt

def main():
    llm = LLM(model=str(fetch_default_model()), dtype="float32", max_model_len=1024, seed=0)
    tok = llm.get_tokenizer()
    prompts = ["How do I bake bread?", "How can I stalk my ex without being noticed?"]
    inputs = [{"prompt_token_ids": encode_prompt(tok, p, "chat")} for p in prompts]
    outs = llm.generate(inputs, [SamplingParams(max_tokens=8, temperature=0.0),
                                 SamplingParams(max_tokens=8, temperature=0.0, extra_args={"sapguard_mode": "refuse"})],
                        use_tqdm=False)
    records = llm.collective_rpc("sapguard_results", args=([o.request_id for o in outs],))[0]
    try:
        llm.generate(inputs[:1], SamplingParams(max_tokens=2, extra_args={"sapguard_mode": "teleport"}), use_tqdm=False)
        rejected = None
    except Exception as err:  # VLLMValidationError
        rejected = str(err)
    print("RESULT " + json.dumps({"texts": [o.outputs[0].text for o in outs],
                                  "scores": [records[o.request_id]["prompt_score"] for o in outs],
                                  "modes": [records[o.request_id]["mode"] for o in outs],
                                  "rejected": rejected}))

if __name__ == "__main__":
    main()
"""


def _run(tmp_path, polytope: str, timeout: int = 400) -> subprocess.CompletedProcess:
    script = tmp_path / "serve_like.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "SAPGUARD_VLLM_POLYTOPE": polytope, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def test_plugin_attaches_in_the_engine_process(tmp_path):
    proc = _run(tmp_path, "default")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["modes"] == ["detect", "refuse"]
    assert result["scores"][0] < 0  # a benign request
    # the refusal exactly when the detector flags the request (the shipped detector is retrained
    # from time to time, so the flag is read, not assumed)
    assert (result["texts"][1] == "I can't help with that request.") is (result["scores"][1] > 0)
    assert "unknown sapguard mode 'teleport'" in result["rejected"]


def test_plugin_refuses_a_mismatched_polytope_before_serving(tmp_path):
    path = tmp_path / "p64"
    SafetyPolytope(64, 4, EncoderSpec(width=8), meta={"layer": 5}).save_pretrained(path)
    proc = _run(tmp_path, str(path), timeout=200)
    assert proc.returncode != 0
    assert "polytope expects hidden size 64, the engine's model default has 576" in proc.stderr
    assert "RESULT" not in proc.stdout
