"""`sap serve`: the guarded OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from sapguard.cli.common import JSON_OPTION, VERBOSE_OPTION, handle_errors, setup_logging
from sapguard.errors import SapError


def log_requests_to_stderr(verbose: bool) -> None:
    """One JSON line per request (the ``sapguard.serve.access`` logger) on stderr; server logs at INFO with -v."""
    access = logging.getLogger("sapguard.serve.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    logging.getLogger("sapguard.serve").setLevel(logging.INFO if verbose else logging.WARNING)


def serve(
    polytope: Path | None = typer.Option(
        None, "--polytope", "-p", help="Polytope directory (default: the shipped default polytope, when present)."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one in the artifact)."),
    mode: str | None = typer.Option(None, "--mode", help="safeflow, redirect, refuse (default) or detect."),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default 8000; 0 picks a free one)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML/JSON file of settings; flags win."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, float16, bfloat16."),
    served_model_name: str | None = typer.Option(None, "--served-model-name",
                                                    help="Model name clients send (default: the base model id)."),
    allowed_mode: list[str] | None = typer.Option(None, "--allowed-mode",
                                                     help="A mode requests may ask for (repeat; default: all)."),
    tokens: str | None = typer.Option(None, "--tokens", help="Hook token policy: prompt, generated, first_n, all."),
    first_n: int | None = typer.Option(None, "--first-n", help="Generated tokens checked under first_n."),
    threshold: float | None = typer.Option(None, "--threshold", help="A position fires above this margin."),
    refusal_text: str | None = typer.Option(None, "--refusal-text", help="Answer of refuse when the prompt fires."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", help="Requests per batch (default 32)."),
    max_wait_ms: float | None = typer.Option(None, "--max-wait-ms", help="Batch fill wait (default 20 ms)."),
    max_queue: int | None = typer.Option(None, "--max-queue", help="Waiting requests before 429 (default 256)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Per-request timeout in s (default 120)."),
    max_body_bytes: int | None = typer.Option(None, "--max-body-bytes", help="Largest body (default 1 MB)."),
    max_input_tokens: int | None = typer.Option(None, "--max-input-tokens", help="Longest prompt in tokens."),
    max_tokens_cap: int | None = typer.Option(None, "--max-tokens-cap", help="Largest max_tokens (default 1024)."),
    default_max_tokens: int | None = typer.Option(None, "--default-max-tokens", help="max_tokens when unset."),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Env var with comma-separated API keys (default SAPGUARD_API_KEYS)."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File with one API key per line."),
    cors_origin: list[str] | None = typer.Option(None, "--cors-origin", help="Allowed CORS origin (repeat)."),
    access_log: bool | None = typer.Option(None, "--access-log/--no-access-log",
                                              help="One JSON line per request on stderr."),
    graceful_timeout: float | None = typer.Option(None, "--graceful-timeout",
                                                     help="Seconds SIGTERM waits for in-flight requests."),
    json_out: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Serve the guarded model: OpenAI chat completions (streaming too), moderations, models, health, metrics."""
    setup_logging(verbose)
    try:
        from sapguard.serve.server import build_state, run_server
    except ImportError as err:
        raise SapError(f"sap serve needs the serve extra: pip install 'sapguard[serve]' ({err.name} missing)") from None
    from sapguard.serve.config import ServeConfig

    settings = ServeConfig.from_sources(
        config, polytope=str(polytope) if polytope else None, model=model, mode=mode, host=host, port=port,
        device=device, dtype=dtype, served_model_name=served_model_name, allowed_modes=allowed_mode or None,
        tokens=tokens, first_n=first_n, threshold=threshold, refusal_text=refusal_text,
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout=timeout,
        max_body_bytes=max_body_bytes, max_input_tokens=max_input_tokens, max_tokens_cap=max_tokens_cap,
        default_max_tokens=default_max_tokens, api_key_env=api_key_env,
        api_key_file=str(api_key_file) if api_key_file else None, cors_origins=cors_origin or None,
        access_log=access_log, graceful_timeout=graceful_timeout,
    )
    log_requests_to_stderr(verbose)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key_file:
        typer.echo(f"warning: listening on {settings.host}, beyond this machine; consider API keys", err=True)
    state = build_state(settings)

    def ready(url: str) -> None:
        info = {"url": url, "model": state.served_model_name, "polytope": state.polytope_label,
                "mode": settings.mode, "auth": state.keys.enabled}
        if json_out:
            typer.echo(json.dumps(info))
        else:
            typer.echo(f"sap serve: {info['model']} guarded by {info['polytope']} (mode {info['mode']}) "
                       f"on {url}; auth {'on' if info['auth'] else 'off'}")
        sys.stdout.flush()

    run_server(settings, state=state, on_ready=ready)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command("serve")(handle_errors(serve))
