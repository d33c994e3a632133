"""vLLM general plugin (entry point ``vllm.general_plugins: sapguard``): the polytope in ``vllm serve``.

vLLM runs :func:`register` in every process it starts (API server, engine core, each worker and
tensor-parallel rank). It does nothing unless ``SAPGUARD_VLLM_POLYTOPE`` is set; then:

- engine configuration (wherever ``EngineArgs.create_engine_config`` runs): registers sapguard's
  worker extension and logits processor, turns on eager mode, turns off prefix caching, selects
  the V1 model runner, and checks the polytope against the model (hidden size, base model, layer,
  default mode), so a mismatch stops the server with a one-line error before it serves a token;
- workers: after the model is loaded, the hook is attached (:func:`sapguard.engines.vllm.attach_to_runner`).

Environment:
    SAPGUARD_VLLM_POLYTOPE  ``default``, ``steering`` or an artifact directory.
    SAPGUARD_VLLM_MODE      default mode for requests that do not name one (default ``detect``).
    SAPGUARD_VLLM_OPTIONS   optional JSON object of other :class:`~sapguard.engines.flat.GuardConfig`
                            fields, e.g. ``{"first_n": 8, "threshold": 0.5}``.
    SAPGUARD_VLLM_REFUSAL   the refusal text of mode ``refuse``.

Per request, ``vllm_xargs`` (HTTP) or ``SamplingParams.extra_args`` pick the mode:
``{"sapguard_mode": "safeflow"}``. Example::

    SAPGUARD_VLLM_POLYTOPE=default vllm serve ~/.cache/sapguard/models/smollm2-135m-instruct --dtype float32
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

ENV_POLYTOPE = "SAPGUARD_VLLM_POLYTOPE"
ENV_MODE = "SAPGUARD_VLLM_MODE"
ENV_OPTIONS = "SAPGUARD_VLLM_OPTIONS"

_PATCHED: dict[str, Any] = {}


def config_from_env() -> Any:
    """The :class:`~sapguard.engines.flat.GuardConfig` the environment asks for, or ``None``."""
    from sapguard.engines.flat import GuardConfig
    from sapguard.errors import SapError

    spec = os.environ.get(ENV_POLYTOPE)
    if not spec:
        return None
    try:
        options = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
    except json.JSONDecodeError as err:
        raise SapError(f"{ENV_OPTIONS} is not valid JSON ({err})") from None
    if not isinstance(options, dict):
        raise SapError(f"{ENV_OPTIONS} must be a JSON object")
    return GuardConfig.from_dict({"polytope": spec, "mode": os.environ.get(ENV_MODE, "detect"), **options})


def _check_engine_config(vllm_config: Any, guard_config: Any) -> None:
    from sapguard.engines.flat import load_guard_polytope
    from sapguard.engines.vllm import check_attach, engine_identity

    model_config = vllm_config.model_config
    hf = model_config.hf_config.get_text_config()
    identity = engine_identity(str(model_config.model), int(hf.hidden_size), int(hf.num_hidden_layers))
    check_attach(load_guard_polytope(guard_config.polytope), guard_config, identity)


def register() -> None:
    """The plugin entry point; idempotent, and a no-op without ``SAPGUARD_VLLM_POLYTOPE``."""
    guard_config = config_from_env()
    if guard_config is None or _PATCHED:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_worker import Worker

    from sapguard.engines.vllm import LOGITS_PROCESSOR, WORKER_EXTENSION, attach_to_runner

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    original_create = EngineArgs.create_engine_config
    original_load = Worker.load_model

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.worker_extension_cls:
            self.worker_extension_cls = WORKER_EXTENSION
        self.enforce_eager = True
        self.enable_prefix_caching = False
        processors = list(self.logits_processors or [])
        if LOGITS_PROCESSOR not in processors:
            processors.append(LOGITS_PROCESSOR)
        self.logits_processors = processors
        config = original_create(self, *args, **kwargs)
        _check_engine_config(config, guard_config)
        return config

    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original_load(self, *args, **kwargs)
        info = attach_to_runner(self.model_runner, guard_config)
        logger.info("sapguard plugin: attached %s", info)

    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    Worker.load_model = load_model  # type: ignore[method-assign]
    _PATCHED.update(create=original_create, load=original_load)
