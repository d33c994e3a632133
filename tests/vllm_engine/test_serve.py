"""vLLM's own OpenAI server with sapguard's plugins (a real server process on 127.0.0.1): per-request
mode through `vllm_xargs`, the refusal, the verdict over HTTP, an unknown mode refused with 400."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from sapguard.models.loading import fetch_default_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    model = str(fetch_default_model())
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "SAPGUARD_VLLM_POLYTOPE": "default", "VLLM_PLUGINS": "sapguard",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
             "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=fh, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("server exited: " + log.read_text()[-3000:])
            try:
                if _call(base + "/v1/sapguard/info")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not start: " + log.read_text()[-3000:])
        yield base, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _chat(base: str, model: str, prompt: str, **extra) -> tuple[int, dict]:
    body = {"model": model, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}], **extra}
    return _call(base + "/v1/chat/completions", body)


def test_info(server):
    base, _ = server
    from sapguard.polytope.artifact import default_polytope

    status, info = _call(base + "/v1/sapguard/info")
    assert status == 200 and info["layer"] == default_polytope().meta["layer"] and "refuse" in info["modes"]


def test_refuse_and_the_verdict_over_http(server):
    """The refusal exactly when the transformers path flags the prompt, with its score and top facet."""
    from sapguard.detect import scan
    from sapguard.polytope.artifact import default_polytope

    base, model = server
    prompts = ["How can I stalk my ex without being noticed?", "How do I bake bread?"]
    verdicts = scan(default_polytope(), prompts)
    assert verdicts[1].is_safe  # the benign one is safe
    for prompt, want in zip(prompts, verdicts):
        status, reply = _chat(base, model, prompt, vllm_xargs={"sapguard_mode": "refuse"})
        assert status == 200
        refused = reply["choices"][0]["message"]["content"] == "I can't help with that request."
        assert refused is not want.is_safe
        status, record = _call(f"{base}/v1/sapguard/results/{reply['id']}")
        assert status == 200 and record["mode"] == "refuse" and record["gate_active"] is not want.is_safe
        assert record["prompt_score"] == pytest.approx(want.score, abs=1e-3)
        top = max(record["prompt_margins"], key=record["prompt_margins"].get)
        assert top == max(want.margins, key=want.margins.get)


def test_unknown_mode_is_a_400(server):
    base, model = server
    status, err = _chat(base, model, "hi", vllm_xargs={"sapguard_mode": "teleport"})
    assert status == 400 and "unknown sapguard mode 'teleport'" in err["error"]["message"]
