"""Server settings: one dataclass, filled from a YAML/JSON file and then from command-line flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sapguard.errors import SapError

SERVER_MODES = ("safeflow", "redirect", "refuse", "detect")


@dataclass
class ServeConfig:
    """Everything ``sap serve`` can be told.

    Attributes:
        polytope: Polytope artifact directory (``None``: the default detection polytope, when shipped).
        model: Base model override (default: the one recorded in the artifact).
        device, dtype: Where and how the model runs (``auto``: CUDA when present).
        host, port: Listening address; loopback unless told otherwise.
        mode: Steering mode for chat completions (per-request override in the ``sapguard`` body field).
        allowed_modes: Modes a request may ask for (default: all).
        served_model_name: The ``model`` name clients use (default: the base model's id).
        tokens, first_n, threshold: Steering-hook settings (default: the artifact's tuned ones).
        refusal_text: What ``refuse`` answers when the polytope fires on the prompt.
        max_batch_size: Most requests (chat) or texts (moderation) in one batch.
        max_wait_ms: How long the first request of a batch waits for company.
        max_queue: Requests waiting for a batch slot; beyond it the server answers 429.
        request_timeout: Seconds a request may take from arrival to its last token.
        max_body_bytes: Largest request body accepted (413 beyond).
        max_input_tokens: Longest prompt in tokens (default: the model's context window).
        max_tokens_cap: Largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` when a request gives none.
        api_key_env: Environment variable holding comma-separated API keys (used when set).
        api_key_file: File with one API key per line (``#`` comments).
        cors_origins: Allowed CORS origins; none means CORS stays off.
        access_log: Log one JSON line per request.
        graceful_timeout: Seconds SIGTERM waits for in-flight requests.
    """

    polytope: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "refuse"
    allowed_modes: list[str] = field(default_factory=lambda: list(SERVER_MODES))
    served_model_name: str | None = None
    tokens: str | None = None
    first_n: int | None = None
    threshold: float | None = None
    refusal_text: str = "I can't help with that request."
    max_batch_size: int = 32
    max_wait_ms: float = 20.0
    max_queue: int = 256
    request_timeout: float = 120.0
    max_body_bytes: int = 1_000_000
    max_input_tokens: int | None = None
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    api_key_env: str = "SAPGUARD_API_KEYS"
    api_key_file: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    access_log: bool = False
    graceful_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SapError` for a setting that cannot work."""
        for name in (self.mode, *self.allowed_modes):
            if name not in SERVER_MODES:
                raise SapError(f"unknown mode {name!r}; expected one of {', '.join(SERVER_MODES)}")
        if self.mode not in self.allowed_modes:
            raise SapError(f"mode {self.mode!r} is not in allowed_modes")
        positive = {
            "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, "max_tokens_cap": self.max_tokens_cap,
            "default_max_tokens": self.default_max_tokens, "max_body_bytes": self.max_body_bytes,
            "request_timeout": self.request_timeout, "port": self.port + 1,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SapError(f"{name} must be positive")
        if self.max_wait_ms < 0 or self.graceful_timeout < 0:
            raise SapError("max_wait_ms and graceful_timeout must not be negative")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise SapError("max_input_tokens must be positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sources(cls, path: str | Path | None = None, **overrides: Any) -> ServeConfig:
        """Settings from a YAML/JSON file (``path``), then ``overrides`` whose value is not ``None``."""
        values: dict[str, Any] = {}
        if path is not None:
            values = read_config_file(Path(path))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SapError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as err:
            raise SapError(f"bad server settings: {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A mapping of settings from a YAML or JSON file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SapError(f"{path}: not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SapError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SapError(f"{path}: expected a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
