"""Build the server from settings and run it under uvicorn; SIGTERM drains in-flight requests."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from sapguard.errors import SapError
from sapguard.models.chat import encode_prompt, resolve_template
from sapguard.models.loading import DEFAULT_MODEL, DEFAULT_MODEL_ID, LoadedModel, load_model
from sapguard.polytope.artifact import check_compatible, load_polytope
from sapguard.polytope.model import SafetyPolytope
from sapguard.serve.app import ServerState, create_app
from sapguard.serve.auth import KeyChecker, load_api_keys
from sapguard.serve.batching import Scheduler
from sapguard.serve.config import ServeConfig
from sapguard.serve.generation import Decoder
from sapguard.serve.metrics import ServerMetrics
from sapguard.steer.artifact import load_steering
from sapguard.steer.generate import eos_ids
from sapguard.steer.modes import SteeringMode, make_mode

logger = logging.getLogger(__name__)


def load_polytope_for(config: ServeConfig) -> tuple[SafetyPolytope, str]:
    """The polytope named in ``config``, or the shipped default (no polytope, or ``"default"``), and a label."""
    if config.polytope is not None and config.polytope != "default":
        return load_steering(config.polytope), str(config.polytope)
    from sapguard import detect
    from sapguard.polytope import artifact

    finder = getattr(artifact, "default_polytope", None) or getattr(detect, "default_polytope", None)
    if finder is None:
        raise SapError("no --polytope given and this sapguard ships no default polytope")
    found = finder()
    poly = found if isinstance(found, SafetyPolytope) else load_polytope(found)
    return poly, "default"


def build_state(
    config: ServeConfig, *, lm: LoadedModel | None = None, poly: SafetyPolytope | None = None
) -> ServerState:
    """Load (or take) the polytope and its base model once and wire the server together."""
    label = str(config.polytope or "")
    if poly is None:
        poly, label = load_polytope_for(config)
    if lm is None:
        base = (poly.meta.get("base_model") or {}).get("id") or DEFAULT_MODEL
        lm = load_model(config.model or base, device=config.device, dtype=config.dtype)
    check_compatible(poly, lm.identity())
    modes: dict[str, SteeringMode] = {}
    allowed = []
    for name in config.allowed_modes:
        try:
            modes[name] = make_mode(name, poly)
            allowed.append(name)
        except SapError as err:
            if name == config.mode:
                raise SapError(f"mode {name}: {err}") from None
            logger.warning("mode %s is not available with this polytope (%s)", name, err)
    config.allowed_modes = allowed
    metrics = ServerMetrics()
    hook_options = {"tokens": config.tokens, "first_n": config.first_n, "threshold": config.threshold}
    decoder = Decoder(lm, poly, modes, hook_options, config.refusal_text, eos_ids(lm),
                      on_facet=lambda name: metrics.facet_firings.labels(name, "chat").inc())
    scheduler = Scheduler(
        lm, poly, decoder, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        observe=lambda kind, size, seconds: metrics.batch_size.labels(kind).observe(size),
    )
    cfg = lm.model.config
    window = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)
    template = resolve_template(lm.tokenizer, poly.meta.get("template") or "auto")
    encode_prompt(lm.tokenizer, "ok", template)  # fail now, not on the first request
    name = config.served_model_name or (DEFAULT_MODEL_ID if lm.model_id == DEFAULT_MODEL else lm.model_id)
    keys = KeyChecker(load_api_keys(config.api_key_env, config.api_key_file))
    return ServerState(
        config=config, lm=lm, poly=poly, scheduler=scheduler, metrics=metrics, keys=keys,
        served_model_name=name, context_window=window,
        max_input_tokens=min(config.max_input_tokens or window, window), template=template, polytope_label=label,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn with two additions: a flag set on SIGTERM/SIGINT and a callback once listening."""

    def __init__(self, config: uvicorn.Config, state: ServerState, on_ready: Callable[[], None] | None = None):
        super().__init__(config)
        self.state = state
        self.on_ready = on_ready

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but a drained SIGTERM/SIGINT is a clean exit (status 0), not re-raised."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SapError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def make_server(state: ServerState, on_ready: Callable[[], None] | None = None) -> DrainingServer:
    """A uvicorn server for ``state`` (quiet: sapguard logs its own access lines)."""
    cfg = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="on", server_header=False,
        timeout_graceful_shutdown=math.ceil(state.config.graceful_timeout), log_config=None,
    )
    return DrainingServer(cfg, state, on_ready)


def run_server(
    config: ServeConfig, *, state: ServerState | None = None, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests finish first (up to ``graceful_timeout``)."""
    state = state or build_state(config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    server = make_server(state, (lambda: on_ready(url)) if on_ready else None)
    server.run(sockets=[sock])
