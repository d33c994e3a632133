"""The polytope inside vLLM: a fixed, server-side forward hook on the engine's own decoder layer.

Three pieces, none of which ships code to the engine (no cloudpickle):

- :class:`SapguardWorkerExtension`, vLLM's ``worker_extension_cls``: methods the engine calls by
  *name* on every worker (``collective_rpc("sapguard_attach", args=(json,))``). Attaching loads the
  polytope from an artifact directory (safetensors + JSON) on the worker and registers a forward
  hook on the decoder block of the polytope's layer (sapguard numbering, see
  :mod:`sapguard.models.layers`).
- :class:`~sapguard.engines.vllm_logits.SapguardLogitsProcessor`, a vLLM logits processor: rejects
  a request naming an unknown mode at admission (HTTP 400 under ``vllm serve``) and answers
  ``refuse`` requests whose prompt fires with a fixed refusal.
- :mod:`sapguard.engines.vllm_plugin`: the ``vllm.general_plugins`` entry point, so that
  ``vllm serve`` workers (every tensor-parallel rank) attach at model load.

vLLM's Llama-style layers return ``(hidden_states, residual)`` with the residual addition deferred
to the next layer's norm: the residual-stream state that transformers calls ``hidden_states[L]``
is their sum, which is what the polytope reads. An edit ``h -> h'`` is written back as
``hidden_states + (h' - h)``, leaving ``residual`` alone.

Rows of the flattened token batch are mapped to requests with the engine's own metadata: the
model runner's persistent batch (``input_batch.req_ids``, ``requests[id].sampling_params``) and
the forward context's ``query_start_loc``; positions come from the layer's ``positions`` argument.
This reads vLLM's V1 model runner (the CPU runner, and the GPU runner with
``VLLM_USE_V2_MODEL_RUNNER=0``, which :func:`build_llm` and the plugin set).

Prefix caching is turned off by :func:`build_llm` and the plugin: a cached prefix is never run
through the layer again, so its tokens would be neither read nor edited, and an edited state's KV
could be reused by another request.

Example:
    >>> from sapguard.engines.vllm import VLLMGuard, build_llm  # doctest: +SKIP
    >>> llm = build_llm("default")  # doctest: +SKIP
    >>> guard = VLLMGuard(llm, polytope="default", mode="detect")  # doctest: +SKIP
    >>> out = guard.generate(["How do I bake bread?"], max_tokens=32)  # doctest: +SKIP
    >>> out[0].verdict.is_safe, out[0].text  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sapguard.detect import Verdict, verdict_from_margins
from sapguard.engines.flat import (
    CAPTURE_KEY,
    GATE_KEY,
    MODE_KEY,
    FlatGuard,
    GuardConfig,
    StepRequests,
    available_modes,
    check_mode,
    features_from_json,
    load_guard_polytope,
)
from sapguard.errors import ArtifactMismatchError, SapError
from sapguard.features.views import polytope_views, tail_view
from sapguard.models.layers import block_for_layer
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.hook import hook_settings

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "sapguard.engines.vllm.SapguardWorkerExtension"
LOGITS_PROCESSOR = "sapguard.engines.vllm_logits:SapguardLogitsProcessor"

_ACTIVE: dict[str, Any] = {}
"""Per worker process: the attached :class:`FlatGuard` (``"guard"``), the model runner
(``"runner"``) and the hook handle (``"handle"``). The logits processor reads it."""


# -- model identity and validation (no vLLM needed) ------------------------------------------------
def engine_identity(model: str, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """What :func:`sapguard.polytope.artifact.check_compatible` compares, for an engine's model path."""
    from sapguard.models.loading import default_model_dir

    path = Path(model)
    model_id = model
    if path.exists():
        model_id = "default" if path.resolve() == default_model_dir().resolve() else str(path.resolve())
    return {"id": model_id, "hidden_size": hidden_size, "num_layers": num_layers}


def capture_only_polytope(hidden_size: int, layer: int | None) -> SafetyPolytope:
    """A polytope that never fires (``phi = 0``, ``xi = 1``), for reading features of any model.

    Used with ``polytope="none"`` by :func:`sapguard.engines.vllm_extract.extract_with_vllm`.
    """
    from sapguard.polytope.model import EncoderSpec

    if layer is None:
        raise SapError("polytope 'none' (feature capture only) needs an explicit layer")
    poly = SafetyPolytope(hidden_size, 1, EncoderSpec(kind="identity"), meta={"layer": layer})
    with torch.no_grad():
        poly.phi.zero_()
        poly.xi.fill_(1.0)
    return poly.eval().requires_grad_(False)


def check_attach(poly: SafetyPolytope, config: GuardConfig, identity: dict[str, Any]) -> int:
    """Every check that can fail, before the engine serves a token; returns the resolved layer.

    Raises:
        SapError: hidden size or base model mismatch, layer out of range, unknown mode, policy,
            gate or capture (one line each).
    """
    if poly.hidden_size != identity["hidden_size"]:
        raise ArtifactMismatchError(
            f"polytope expects hidden size {poly.hidden_size}, the engine's model {identity['id']} has "
            f"{identity['hidden_size']}; use a polytope trained on this model"
        )
    base = (poly.meta.get("base_model") or {}).get("id")
    if base and base != identity["id"]:
        raise ArtifactMismatchError(
            f"polytope was trained on {base!r}, the engine serves {identity['id']!r}; pass the matching model"
        )
    guard = FlatGuard(poly, config, hidden_size=identity["hidden_size"], num_layers=identity["num_layers"])
    return guard.layer


def build_llm(model: str = "default", *, polytope: str | None = None, mode: str = "detect", **llm_kwargs: Any) -> Any:
    """A vLLM ``LLM`` ready for :class:`VLLMGuard`: the worker extension and the logits processor
    registered, V1 model runner, eager mode, no prefix caching, float32 on CPU.

    Args:
        model: ``"default"`` (the embedded SmolLM2-135M-Instruct, fetched into the cache) or
            anything vLLM accepts (Hub id, local directory).
        polytope: When given, the polytope's hidden size is checked against the model's config
            *before* the engine starts (a mismatch is a one-line :class:`SapError`).
        mode: Checked against the polytope's modes with ``polytope``.
        **llm_kwargs: Passed to ``vllm.LLM`` (override the defaults above).
    """
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if model == "default":
        from sapguard.models.loading import fetch_default_model

        model = str(fetch_default_model())
    if polytope is not None:
        _precheck(model, polytope, mode)
    try:
        from vllm import LLM
    except ImportError as err:
        raise SapError(
            f"vLLM is not importable here ({err}); the vLLM engine runs in its own environment: "
            "`make vllm-env`, then .venv-vllm/bin/sap"
        ) from None

    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "max_model_len": 2048,
        "seed": 0,
        "worker_extension_cls": WORKER_EXTENSION,
        "logits_processors": [LOGITS_PROCESSOR],
    }
    kwargs.update(llm_kwargs)
    return LLM(model=model, **kwargs)


def _precheck(model: str, polytope: str, mode: str) -> None:
    """Hidden size, layer count and mode from the model's ``config.json``, without starting an engine."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return  # a Hub id: checked at attach, still before serving
    cfg = json.loads(config_path.read_text())
    cfg = cfg.get("text_config", cfg)
    poly = load_guard_polytope(polytope)
    identity = engine_identity(model, int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]))
    check_attach(poly, GuardConfig(polytope=polytope, mode=mode), identity)


# -- worker side -----------------------------------------------------------------------------------
def _query_start_loc(num_reqs: int) -> list[int] | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    if not meta:
        return None
    for value in meta.values() if isinstance(meta, dict) else [meta]:
        qsl = getattr(value, "query_start_loc", None)
        if qsl is not None:
            out: list[int] = qsl[: num_reqs + 1].tolist()
            return out if len(out) == num_reqs + 1 else None
    return None


def _make_hook(guard: FlatGuard, runner: Any) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        start = time.perf_counter()
        try:
            return _guarded(args, kwargs, output)
        finally:
            guard.hook_seconds += time.perf_counter() - start
            guard.hook_calls += 1

    def _guarded(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        batch = runner.input_batch
        num_reqs = int(batch.num_reqs)
        if num_reqs == 0:
            return None
        starts = _query_start_loc(num_reqs)
        if starts is None:  # profiling / dummy runs carry no requests
            return None
        positions = args[0] if args else kwargs.get("positions")
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
            return None
        req_ids = list(batch.req_ids[:num_reqs])
        prompt_lens, modes, captures, gated_on = [], [], [], []
        for rid in req_ids:
            state = runner.requests.get(rid)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None)
            prompt_lens.append(int(getattr(state, "num_prompt_tokens", 0) or 0))
            modes.append(guard.mode_of(extra))
            captures.append(guard.capture_of(extra))
            gated_on.append(guard.gated_on(extra))
        if isinstance(output, tuple):
            hidden, residual = output[0], output[1] if len(output) > 1 else None
        else:
            hidden, residual = output, None
        stream = hidden + residual if isinstance(residual, torch.Tensor) else hidden
        delta = guard.step(stream, positions, StepRequests(req_ids, starts, prompt_lens, modes, captures, gated_on))
        if delta is None:
            return None
        edited = hidden + delta.to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def attach_to_runner(runner: Any, config: GuardConfig) -> dict[str, Any]:
    """Load the polytope on this worker and hook the runner's model; replaces a previous attach."""
    detach_from_runner()
    if not hasattr(runner, "input_batch") or not hasattr(runner, "requests"):
        raise SapError(
            f"{type(runner).__name__} is not vLLM's V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    model_config = runner.model_config
    hf = model_config.hf_config.get_text_config()
    identity = engine_identity(str(model_config.model), int(hf.hidden_size), int(hf.num_hidden_layers))
    poly = (
        capture_only_polytope(identity["hidden_size"], config.layer)
        if config.polytope == "none"
        else load_guard_polytope(config.polytope)
    )
    layer = check_attach(poly, config, identity)
    guard = FlatGuard(poly, config, hidden_size=identity["hidden_size"], num_layers=identity["num_layers"])
    block = block_for_layer(runner.model, layer)
    handle = block.register_forward_hook(_make_hook(guard, runner), with_kwargs=True)
    _ACTIVE.update(guard=guard, runner=runner, handle=handle)
    logger.info("sapguard: polytope %s attached at layer %d (mode %s)", config.polytope, layer, guard.default_mode)
    return {
        "layer": layer,
        "hidden_size": identity["hidden_size"],
        "num_layers": identity["num_layers"],
        "modes": list(guard.available),
        "default_mode": guard.default_mode,
        "facet_names": guard.names,
        "tokens": guard.tokens,
        "first_n": guard.first_n,
        "threshold": guard.threshold,
        "gate": guard.gate,
    }


def detach_from_runner() -> bool:
    """Remove the hook from this worker (no-op when none is attached)."""
    handle = _ACTIVE.pop("handle", None)
    _ACTIVE.pop("guard", None)
    _ACTIVE.pop("runner", None)
    if handle is None:
        return False
    handle.remove()
    return True


class SapguardWorkerExtension:
    """vLLM worker extension (``worker_extension_cls``): methods called by name on every worker.

    Arguments and results are plain JSON-like values (strings, lists, dicts, bytes), so they cross
    process boundaries with vLLM's msgpack serialisation; nothing is unpickled.
    """

    model_runner: Any

    def sapguard_attach(self, config_json: str) -> dict[str, Any]:
        """Attach the polytope described by a :class:`GuardConfig` as JSON."""
        return attach_to_runner(self.model_runner, GuardConfig.from_dict(json.loads(config_json)))

    def sapguard_detach(self) -> bool:
        return detach_from_runner()

    def sapguard_results(
        self, req_ids: list[str] | None = None, features: bool = False, remove: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Records of finished requests by (external) id; engine ids ``"{id}-{suffix}"`` match too."""
        guard: FlatGuard | None = _ACTIVE.get("guard")
        if guard is None:
            return {}
        found = guard.pop(req_ids, remove=remove)
        return {rid: rec.to_json(guard.names, features=features) for rid, rec in found.items()}

    def sapguard_info(self) -> dict[str, Any] | None:
        guard: FlatGuard | None = _ACTIVE.get("guard")
        if guard is None:
            return None
        return {
            "layer": guard.layer,
            "modes": list(guard.available),
            "default_mode": guard.default_mode,
            "hook_seconds": guard.hook_seconds,
            "hook_calls": guard.hook_calls,
        }


# -- client side -----------------------------------------------------------------------------------
@dataclass
class GuardedOutput:
    """One request's generation and what the polytope said about it.

    Attributes:
        prompt: The user prompt.
        text: Generated text.
        token_ids: Generated token ids.
        mode: The mode the request ran with.
        verdict: Detection verdict on the prompt (its last templated position), ``None`` for mode ``off``.
        refused: ``refuse`` mode answered with the fixed refusal.
        record: The engine-side record (per-token scores, fired/edited token counts, solver steps).
    """

    prompt: str
    text: str
    token_ids: list[int]
    mode: str
    verdict: Verdict | None
    refused: bool
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("verdict", "record")}
        out["verdict"] = self.verdict.to_json() if self.verdict is not None else None
        out["record"] = {k: v for k, v in self.record.items() if k != "features"}
        return out


class VLLMGuard:
    """A polytope attached to a vLLM ``LLM`` (offline engine), with per-request modes.

    Args:
        llm: An ``LLM`` built with the worker extension (:func:`build_llm` does it).
        polytope: ``"default"``, ``"steering"``, an artifact directory, or ``"none"`` (feature
            capture only, with ``layer``).
        mode: Default mode (:data:`~sapguard.engines.flat.ENGINE_MODES`); requests may override it.
        **options: Other :class:`GuardConfig` fields (``layer``, ``tokens``, ``first_n``,
            ``threshold``, ``gate``, ``capture``, ``record_tokens``).

    Raises:
        SapError: a polytope for another model or hidden size, a layer out of range, an unknown
            mode, or an engine built without the worker extension, before any token is served.
    """

    def __init__(self, llm: Any, polytope: str | Path = "default", *, mode: str = "detect", **options: Any):
        self.llm = llm
        self.config = GuardConfig(polytope=str(polytope), mode=mode, **options)
        model_config = llm.llm_engine.model_config
        hf = model_config.hf_config.get_text_config()
        identity = engine_identity(str(model_config.model), int(hf.hidden_size), int(hf.num_hidden_layers))
        self.identity = identity
        self.poly = (
            capture_only_polytope(identity["hidden_size"], self.config.layer)
            if self.config.polytope == "none"
            else load_guard_polytope(self.config.polytope)
        )
        self.layer = check_attach(self.poly, self.config, identity)
        try:
            infos = llm.collective_rpc("sapguard_attach", args=(json.dumps(self.config.to_dict()),))
        except (AttributeError, NotImplementedError, RuntimeError) as err:
            # in-process engines raise NotImplementedError("Method 'sapguard_attach' is not
            # implemented."); engine-core processes report it inside a RuntimeError
            if isinstance(err, RuntimeError) and "not implemented" not in str(err):
                raise
            raise SapError(
                "this vLLM engine was built without sapguard's worker extension; build it with "
                f"sapguard.engines.vllm.build_llm or LLM(..., worker_extension_cls={WORKER_EXTENSION!r})"
            ) from None
        self.info: dict[str, Any] = infos[0]
        self.modes: tuple[str, ...] = available_modes(self.poly)
        self.tokenizer = llm.get_tokenizer()

    def detach(self) -> None:
        """Remove the hook from every worker."""
        self.llm.collective_rpc("sapguard_detach")

    def __enter__(self) -> VLLMGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def sampling_params(self, base: Any = None, *, mode: str | None = None, capture: str | None = None, **kwargs: Any) -> Any:
        """``SamplingParams`` carrying the request's mode in ``extra_args`` (validated here).

        Args:
            base: A ``SamplingParams`` to copy (then ``kwargs`` must be empty), else one is built
                from ``kwargs``.
        """
        from vllm import SamplingParams

        if base is not None and kwargs:
            raise SapError("pass either a base SamplingParams or keyword arguments, not both")
        params = copy.deepcopy(base) if base is not None else SamplingParams(**kwargs)
        extra = dict(params.extra_args or {})
        if mode is not None:
            extra[MODE_KEY] = check_mode(mode, self.modes)
        if capture is not None:
            extra[CAPTURE_KEY] = capture
        params.extra_args = extra
        return params

    def encode(self, prompt: str, template: str | None = None) -> list[int]:
        """Token ids of a prompt under the polytope's template (the transformers path's encoding)."""
        from sapguard.models.chat import encode_prompt, resolve_template

        resolved = resolve_template(self.tokenizer, template or str(self.poly.meta.get("template", "auto")))
        return encode_prompt(self.tokenizer, prompt, resolved)

    def generate(
        self,
        prompts: Sequence[str],
        sampling_params: Any = None,
        *,
        mode: str | None = None,
        modes: Sequence[str | None] | None = None,
        capture: str | None = None,
        template: str | None = None,
        use_tqdm: bool = False,
        **sampling_kwargs: Any,
    ) -> list[GuardedOutput]:
        """Generate with the polytope; verdicts and records come back in input order.

        Args:
            prompts: User prompts (templated as the polytope was trained, see :meth:`encode`).
            sampling_params: A base ``SamplingParams`` (else built from ``sampling_kwargs``,
                greedy by default).
            mode: One mode for every prompt; ``modes``: one per prompt (``None``: the default).
            capture: Keep feature rows (``last_prompt`` or ``prompt``) in each output's record.
        """
        if modes is not None and len(modes) != len(prompts):
            raise SapError(f"{len(modes)} modes for {len(prompts)} prompts")
        if sampling_params is not None and sampling_kwargs:
            raise SapError("pass either sampling_params or sampling keyword arguments, not both")
        if sampling_params is None:
            sampling_kwargs.setdefault("temperature", 0.0)
        per_mode = list(modes) if modes is not None else [mode] * len(prompts)
        params = [self.sampling_params(sampling_params, mode=m, capture=capture, **sampling_kwargs) for m in per_mode]
        for p, on in zip(params, self._tails_fire(prompts, per_mode, template)):
            if on:
                p.extra_args = {**(p.extra_args or {}), GATE_KEY: True}
        inputs = [{"prompt_token_ids": self.encode(p, template)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=use_tqdm)
        records = self.llm.collective_rpc(
            "sapguard_results", args=([o.request_id for o in outputs], capture is not None)
        )[0]
        results = []
        for prompt, m, out in zip(prompts, per_mode, outputs):
            rec = records.get(out.request_id, {})
            margins = rec.get("prompt_margins")
            mode_used = rec.get("mode", m or self.config.mode)
            verdict = verdict_from_margins(self.poly, prompt, list(margins.values())) if margins else None
            completion = out.outputs[0]
            results.append(
                GuardedOutput(
                    prompt=prompt,
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    mode=mode_used,
                    verdict=verdict,
                    refused=bool(mode_used == "refuse" and rec.get("gate_active")),
                    record=rec,
                )
            )
        return results

    def _tails_fire(self, prompts: Sequence[str], modes: Sequence[str | None], template: str | None) -> list[bool]:
        """For a prompt-scope gate whose polytope reads the tail view: which prompts of gated modes have a
        tail view that fires (one detect prefill per such tail), as ``steer.generate`` does."""
        settings = hook_settings(self.poly, tokens=self.config.tokens, first_n=self.config.first_n,
                                 threshold=self.config.threshold, gate=self.config.gate)
        views, words = polytope_views(self.poly.meta)
        out = [False] * len(prompts)
        if settings["gate"] != "prompt" or "tail" not in views:
            return out
        gated = {name for name in self.modes if name not in ("off", "detect")}
        tails = {i: t for i, (p, m) in enumerate(zip(prompts, modes))
                 if (m or self.config.mode) in gated and (t := tail_view(p, words)) is not None}
        if tails:
            reads = self.generate(list(tails.values()), mode="detect", template=template, max_tokens=1)
            for i, read in zip(tails, reads):
                margins = read.record.get("prompt_margins") or {}
                out[i] = bool(margins) and max(margins.values()) > float(settings["threshold"])
        return out

    def scan(self, texts: Sequence[str], *, template: str | None = None) -> list[Verdict]:
        """Detection only: one prefill per text (one generated token, discarded), verdicts in order.

        A polytope that reads the tail view (:mod:`sapguard.features.views`) gets one more prefill
        per text that has one, and each margin is the larger of the two, as in :func:`sapguard.detect.scan`.
        """
        views, words = polytope_views(self.poly.meta)
        tails = [tail_view(t, words) if "tail" in views else None for t in texts]
        extra = [t for t in tails if t is not None]
        outs = self.generate([*texts, *extra], mode="detect", template=template, max_tokens=1)
        missing = [o.prompt for o in outs if o.verdict is None]
        if missing:
            raise SapError(f"no verdict for {len(missing)} text(s); was the hook detached?")
        verdicts = [o.verdict for o in outs if o.verdict is not None]
        tail_verdicts = iter(verdicts[len(texts) :])
        out = []
        for verdict, tail in zip(verdicts[: len(texts)], tails):
            if tail is not None:
                other = next(tail_verdicts)
                margins = [max(verdict.margins[n], other.margins[n]) for n in self.poly.facet_names]
                verdict = verdict_from_margins(self.poly, verdict.text, margins, tail_read=True)
            out.append(verdict)
        return out

    def features(
        self, prompts: Sequence[str], *, positions: str = "last_prompt", template: str | None = None
    ) -> list[torch.Tensor]:
        """Residual-stream states at the polytope's layer: ``[1, d]`` (last prompt position) or
        ``[n_prompt, d]`` (every prompt position) per prompt, float32."""
        outs = self.generate(prompts, mode="detect", capture=positions, template=template, max_tokens=1)
        feats = []
        for out in outs:
            payload = out.record.get("features")
            if payload is None:
                raise SapError(f"no features captured for prompt {out.prompt[:40]!r}")
            feats.append(features_from_json(payload)[1])
        return feats



def model_for_polytope(poly: SafetyPolytope) -> str:
    """The model an artifact records (``"default"`` for the embedded one), for :func:`build_llm`."""
    return str((poly.meta.get("base_model") or {}).get("id") or "default")


def scan_with_vllm(polytope: str | Path, texts: Sequence[str], **llm_kwargs: Any) -> list[Verdict]:
    """``sap detect --engine vllm``: start an engine on the polytope's base model and scan ``texts``.

    Texts longer than the engine's ``max_model_len`` are refused by vLLM (no windowing on this path;
    the transformers path reads long texts in windows).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    poly = load_guard_polytope(polytope)
    llm = build_llm(model_for_polytope(poly), polytope=str(polytope), **llm_kwargs)
    guard = VLLMGuard(llm, polytope, mode="detect", record_tokens=False)
    return guard.scan(texts)
