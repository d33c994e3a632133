"""Steered generation: prompts in, responses with per-token traces out.

``refuse`` runs the hook in trace-only mode and answers rows where the polytope fired at a
position the token policy selects (prompt positions or generated tokens) with ``refusal_text``; such rows stop generating as soon as the polytope fires. Fallback: when
SafeFlow's optimisation goes non-finite for a row, that row is answered with ``refusal_text``
too and marked ``fallback="refusal"``; steering never silently returns an unsteered answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.features.extract import extract_features
from sapguard.features.hooks import left_pad
from sapguard.features.views import polytope_views, tail_view
from sapguard.models.chat import encode_prompt, resolve_template
from sapguard.models.loading import LoadedModel
from sapguard.polytope.artifact import check_compatible
from sapguard.polytope.model import SafetyPolytope, read_in_batches
from sapguard.steer.hook import SteeringHook, hook_settings
from sapguard.steer.modes import SteeringMode, make_mode
from sapguard.steer.trace import TokenTrace, TraceSummary, row_trace

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL = "I can't help with that request."


@dataclass
class Generation:
    """One prompt's answer.

    Attributes:
        prompt: The user prompt.
        response: The decoded answer (EOS and what follows removed).
        token_ids: The generated ids up to (excluding) EOS.
        mode: Steering mode name, or ``"none"``.
        trace: Per generated token (empty without a polytope).
        summary: Counts over the trace.
        refused: The answer was replaced by the refusal text (``refuse`` mode or fallback).
        fallback: ``"refusal"`` when SafeFlow failed and the fallback answered, else ``None``.
        logits: ``[len(token_ids), V]`` next-token logits when requested.
    """

    prompt: str
    response: str
    token_ids: list[int]
    mode: str
    trace: list[TokenTrace] = field(default_factory=list)
    summary: TraceSummary = field(default_factory=TraceSummary)
    refused: bool = False
    fallback: str | None = None
    logits: torch.Tensor | None = None

    def to_json(self, with_trace: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "response": self.response,
            "mode": self.mode,
            "refused": self.refused,
            "fallback": self.fallback,
            "summary": self.summary.to_json(),
        }
        if with_trace:
            out["trace"] = [t.to_json() for t in self.trace]
        return out


def eos_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end a response."""
    ids: set[int] = set()
    for value in (getattr(lm.model.generation_config, "eos_token_id", None), lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _context_window(lm: LoadedModel) -> int | None:
    cfg = lm.model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def generate(
    lm: LoadedModel,
    prompts: list[str],
    poly: SafetyPolytope | None = None,
    mode: str | SteeringMode | None = "safeflow",
    *,
    tokens: str | None = None,
    first_n: int | None = None,
    threshold: float | None = None,
    gate: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    system: str | None = None,
    template: str | None = None,
    refusal_text: str = DEFAULT_REFUSAL,
    mode_options: dict[str, Any] | None = None,
    return_logits: bool = False,
    show_progress: bool = False,
    gate_on: Sequence[bool] | None = None,
) -> list[Generation]:
    """Generate answers, steered by ``poly`` in ``mode`` (or plainly when ``poly``/``mode`` is None).

    Args:
        lm: The base model (must match the polytope: id, hidden size, layer).
        prompts: User prompts (non-empty).
        poly: The polytope, or ``None`` for plain generation.
        mode: ``"safeflow"``, ``"redirect"``, ``"refuse"``, ``"detect"``, a mode object, or ``None``.
        tokens, first_n, threshold, gate: See :class:`~sapguard.steer.hook.SteeringHook`; ``None``
            takes the polytope's tuned ``meta["steering"]["hook"]`` settings, else first_n / 20 / 0.0 /
            position.
        max_new_tokens, do_sample, temperature, top_p, seed: Decoding settings.
        system: Optional system prompt (chat template only).
        template: Override of the polytope's template (default: its ``meta["template"]`` or auto).
        refusal_text: Answer for ``refuse`` mode and the SafeFlow fallback.
        mode_options: Overrides passed to :func:`~sapguard.steer.modes.make_mode`.
        return_logits: Keep each step's next-token logits (for KL measurements).
        gate_on: One flag per prompt: gate these rows on whatever the polytope reads (an outside
            filter's decision, e.g. a perplexity or moderation check); needs a prompt-scope gate.

    Raises:
        SapError: for an empty prompt, a prompt longer than the context window or a polytope
            made for another model.
    """
    if not prompts:
        raise SapError("no prompts given")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SapError(f"prompt {i + 1} is empty")
    if max_new_tokens < 1:
        raise SapError("max_new_tokens must be at least 1")
    steering = poly is not None and mode is not None
    mode_obj: SteeringMode | None = None
    if steering:
        assert poly is not None
        check_compatible(poly, lm.identity())
        mode_obj = make_mode(mode, poly, **(mode_options or {})) if isinstance(mode, str) else mode
    template = resolve_template(
        lm.tokenizer, template or (poly.meta.get("template") if poly is not None else None) or "auto"
    )
    encoded = [encode_prompt(lm.tokenizer, p, template, system) for p in prompts]
    window = _context_window(lm)
    for i, ids in enumerate(encoded):
        if window and len(ids) + max_new_tokens > window:
            raise SapError(
                f"prompt {i + 1} is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the {window}-token context window"
            )
    mode_name = (
        (mode if isinstance(mode, str) else mode_obj.name if mode_obj else "none") if steering else "none"
    )
    stops = eos_ids(lm)
    if seed is not None:
        torch.manual_seed(seed)
    hook = None
    tail_fired = None
    if steering:
        assert poly is not None and mode_obj is not None
        settings = hook_settings(poly, tokens=tokens, first_n=first_n, threshold=threshold, gate=gate)
        if settings["gate"] == "prompt":  # read before the hook is installed: this forward is not steered
            tail_fired = tail_gate_fires(lm, poly, prompts, template, float(settings["threshold"]))
        if gate_on is not None:
            if len(gate_on) != len(prompts):
                raise SapError(f"gate_on has {len(gate_on)} flags for {len(prompts)} prompts")
            if settings["gate"] != "prompt":
                raise SapError("gate_on needs a prompt-scope gate (gate='prompt')")
            forced = torch.tensor([bool(g) for g in gate_on])
            tail_fired = forced if tail_fired is None else tail_fired | forced
        hook = SteeringHook(lm.model, poly, mode_obj, **settings)
    results: list[tuple[int, Generation]] = []
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not show_progress):
            results.extend(
                zip(
                    batch,
                    _generate_batch(
                        lm,
                        [prompts[i] for i in batch],
                        [encoded[i] for i in batch],
                        hook,
                        mode_name,
                        stops,
                        max_new_tokens,
                        do_sample,
                        temperature,
                        top_p,
                        refusal_text,
                        return_logits,
                        poly,
                        tail_fired[batch] if tail_fired is not None else None,
                    ),
                )
            )
    finally:
        if hook is not None:
            hook.remove()
    results.sort(key=lambda pair: pair[0])
    return [g for _, g in results]


def tail_gate_fires(
    lm: LoadedModel, poly: SafetyPolytope, prompts: list[str], template: str, threshold: float
) -> torch.Tensor | None:
    """``[len(prompts)]``: whether the gate fires on each prompt's tail view (its last line read alone),
    for a polytope whose config lists the ``tail`` view; ``None`` otherwise or when no prompt has one."""
    views, words = polytope_views(poly.meta)
    if "tail" not in views:
        return None
    return gate_fires(lm, poly, [tail_view(p, words) for p in prompts], template, threshold)


def gate_fires(
    lm: LoadedModel, poly: SafetyPolytope, texts: list[str | None], template: str, threshold: float
) -> torch.Tensor | None:
    """``[len(texts)]``: whether the polytope fires at the last position of each text read as a prompt
    of its own (``None`` entries: False); ``None`` when every entry is ``None``."""
    given = {i: t for i, t in enumerate(texts) if t is not None}
    if not given:
        return None
    x, index, _ = extract_features(
        lm, [Record(prompt=t) for t in given.values()], int(poly.meta["layer"]), policy="last_prompt", template=template
    )
    fired = torch.zeros(len(texts), dtype=torch.bool)
    fired[torch.tensor(list(given))[index]] = read_in_batches(poly, x).max(dim=1).values > threshold
    return fired


class _StopWhenFired(StoppingCriteria):
    """Per-row stop for ``refuse``: a row whose answer is replaced needs no more tokens."""

    def __init__(self, hook: SteeringHook):
        self.hook = hook

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        fired = self.hook.fired_rows
        if fired is None or len(fired) != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return fired.to(input_ids.device)


def _generate_batch(
    lm: LoadedModel,
    prompts: list[str],
    encoded: list[list[int]],
    hook: SteeringHook | None,
    mode_name: str,
    stops: set[int],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    refusal_text: str,
    return_logits: bool,
    poly: SafetyPolytope | None,
    forced: torch.Tensor | None = None,
) -> list[Generation]:
    inputs = left_pad(encoded, lm.tokenizer.pad_token_id, lm.device)
    inputs.pop("position_ids")
    if hook is not None:
        hook.reset()
        hook.forced_rows = forced
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_p=top_p)
    else:
        sampling.update(temperature=None, top_p=None, top_k=None)
    if hook is not None and mode_name == "refuse":
        # Rows whose answer will be replaced stop as soon as the polytope fires.
        sampling["stopping_criteria"] = StoppingCriteriaList([_StopWhenFired(hook)])
    with torch.no_grad():
        out = lm.model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=return_logits,
            **sampling,
        )
    width = inputs["input_ids"].shape[1]
    new = out.sequences[:, width:].tolist()
    gens = []
    for row, (prompt, ids) in enumerate(zip(prompts, new)):
        cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        ids = ids[:cut]
        gen = Generation(prompt, lm.tokenizer.decode(ids, skip_special_tokens=True), ids, mode_name)
        if return_logits and out.logits:
            gen.logits = (
                torch.stack([step[row] for step in out.logits[:cut]]).float().cpu() if cut else torch.zeros(0)
            )
        if hook is not None and poly is not None:
            toks = lm.tokenizer.convert_ids_to_tokens(ids)
            gen.trace, gen.summary = row_trace(hook.trace, row, toks, poly.facet_names)
            if gen.summary.failed_tokens:
                gen.response, gen.refused, gen.fallback = refusal_text, True, "refusal"
            elif mode_name == "refuse":
                gen = refuse(gen, refusal_text)
        gens.append(gen)
    return gens


def refuse_fires(summary: TraceSummary) -> bool:
    """Refuse mode's rule: a row is refused when the polytope fired at a selected prompt position or
    at a generated token the token policy steers (firing elsewhere is reported, not acted on)."""
    return summary.prompt_fired or summary.fired_steered > 0


def refuse(gen: Generation, refusal_text: str, *, drop_logits: bool = False) -> Generation:
    """``gen`` as refuse mode answers it: a copy in mode ``"refuse"`` whose response is ``refusal_text``
    (and ``refused`` set) when :func:`refuse_fires` holds on its trace; ``gen`` itself is not changed.

    Used by :func:`generate` in ``refuse`` mode and by the bench, which answers its refuse condition
    from the base run's ``detect`` traces. ``drop_logits``: a refused copy keeps no logits (they are
    those of the answer not given).
    """
    if not refuse_fires(gen.summary):
        return replace(gen, mode="refuse")
    return replace(
        gen, mode="refuse", response=refusal_text, refused=True, logits=None if drop_logits else gen.logits
    )
