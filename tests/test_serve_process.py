"""`sap serve` as a real process: the CLI, its config file, and SIGTERM with a request in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import make_tiny
from tests.steer_fixtures import ALWAYS, NEVER, tiny_polytope

SAP = [sys.executable, "-c", "from sapguard.cli import app; app()"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model on disk and two polytopes for it: one never fires, one always does."""
    root = tmp_path_factory.mktemp("serve")
    lm = make_tiny("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    for name, offset in (("never", NEVER), ("always", ALWAYS)):
        poly = tiny_polytope(lm, offset=offset)
        poly.meta["base_model"] = dict(poly.meta["base_model"], id=str((root / "model").resolve()))
        poly.save_pretrained(root / name)
    return root


def start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start `sap serve --json --port 0 ...` and wait for its ready line."""
    proc = subprocess.Popen(
        [*SAP, "serve", "--port", "0", "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"sap serve did not start: {proc.communicate(timeout=10)[1][-2000:]}")
    return proc, json.loads(line)


@pytest.fixture
def server(saved: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def launch(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        proc, info = start(list(args), env)
        procs.append(proc)
        return proc, info

    try:
        yield launch
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def test_cli_serves_then_drains_on_sigterm(saved: Path, server: Any, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("mode: refuse\nserved_model_name: guarded\nrefusal_text: Not with me.\naccess_log: true\n"
                      "tokens: generated\nfirst_n: 1000\n")
    proc, info = server("--polytope", str(saved / "always"), "--config", str(config))
    assert info["url"].startswith("http://127.0.0.1:") and info["model"] == "guarded" and info["mode"] == "refuse"
    client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="none", max_retries=0)
    resp = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "steal card"}])
    assert resp.choices[0].message.content == "Not with me."
    assert resp.choices[0].finish_reason == "content_filter"
    assert client.moderations.create(input="steal card").results[0].flagged is True
    # SafeFlow on a polytope that always fires: every token costs an optimisation, so the stream lasts.
    stream = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "bake bread"}],
                                            max_tokens=40, temperature=0, stream=True,
                                            extra_body={"sapguard": {"mode": "safeflow"}})
    chunks = iter(stream)
    next(chunks)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("length", "stop")  # the stream in flight finished normally
    assert sum(1 for c in rest if c.choices and c.choices[0].delta.content) > 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - signalled < 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(info["url"] + "/health", timeout=2)
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(a["path"], a["status"]) for a in access] == [
        ("/v1/chat/completions", 200), ("/v1/moderations", 200), ("/v1/chat/completions", 200)]


def test_cli_refuses_bad_settings(saved: Path) -> None:
    from typer.testing import CliRunner

    from sapguard.cli import app

    out = CliRunner().invoke(app, ["serve", "--polytope", str(saved / "never"), "--mode", "loud"])
    assert out.exit_code == 2 and out.stderr.startswith("error: unknown mode 'loud'")
    out = CliRunner().invoke(app, ["serve", "--polytope", str(saved / "never"), "--max-queue", "0"])
    assert out.exit_code == 2 and "max_queue must be positive" in out.stderr
