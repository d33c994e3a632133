"""sapguard's vLLM logits processor: per-request mode validation at admission, and ``refuse``.

vLLM calls :meth:`SapguardLogitsProcessor.validate_params` on every request before scheduling it,
so a request naming an unknown ``sapguard_mode`` is rejected there (``VLLMValidationError``; HTTP 400 under
``vllm serve``) and never reaches the engine. In the worker, ``refuse`` requests whose prompt
fired the polytope (the forward hook of :mod:`sapguard.engines.vllm` decides at the last prompt
position, in the same step that samples the first token) are forced to emit the fixed refusal
followed by end-of-sequence; every other row's logits are untouched.

This module imports vLLM; keep it out of code that must import without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from sapguard.engines.flat import CAPTURE, CAPTURE_KEY, ENGINE_MODES, MODE_KEY, available_modes, check_mode
from sapguard.errors import SapError

REFUSAL_ENV = "SAPGUARD_VLLM_REFUSAL"


def _refusal_text() -> str:
    from sapguard.steer.generate import DEFAULT_REFUSAL

    return os.environ.get(REFUSAL_ENV, DEFAULT_REFUSAL)


@functools.lru_cache(maxsize=4)
def _modes_for(spec: str) -> tuple[str, ...]:
    from sapguard.engines.flat import load_guard_polytope

    return available_modes(load_guard_polytope(spec))


class SapguardLogitsProcessor(LogitsProcessor):
    """Validates ``extra_args["sapguard_mode"]``; forces the refusal for fired ``refuse`` requests."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = sampling_params.extra_args or {}
        mode = extra.get(MODE_KEY)
        if mode is not None:
            spec = os.environ.get("SAPGUARD_VLLM_POLYTOPE")
            try:
                check_mode(mode, _modes_for(spec) if spec else ENGINE_MODES)
            except SapError as err:
                raise VLLMValidationError(str(err), parameter=MODE_KEY, value=mode) from None
        capture = extra.get(CAPTURE_KEY)
        if capture is not None and capture not in CAPTURE:
            raise VLLMValidationError(
                f"unknown sapguard capture {capture!r}; expected last_prompt or prompt", parameter=CAPTURE_KEY, value=capture
            )

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision)
        self.refusal_ids: list[int] = list(tokenizer(_refusal_text(), add_special_tokens=False)["input_ids"])
        eos = tokenizer.eos_token_id
        self.eos_id: int | None = int(eos) if eos is not None else None
        self.rows: dict[int, list[int]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        from sapguard.engines.vllm import _ACTIVE

        guard = _ACTIVE.get("guard")
        default = guard.default_mode if guard is not None else None

        def new_state(params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> list[int] | None:
            mode = (params.extra_args or {}).get(MODE_KEY) or default
            return output_ids if mode == "refuse" else None

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        from sapguard.engines.vllm import _ACTIVE

        guard, runner = _ACTIVE.get("guard"), _ACTIVE.get("runner")
        if guard is None or runner is None:
            return logits
        req_ids = runner.input_batch.req_ids
        for row, output_ids in self.rows.items():
            if row >= logits.shape[0] or row >= len(req_ids):
                continue
            rec = guard.records.get(req_ids[row])
            if rec is None or not rec.active:
                continue
            k = len(output_ids)
            token = self.refusal_ids[k] if k < len(self.refusal_ids) else self.eos_id
            if token is None:
                continue
            logits[row] = float("-inf")
            logits[row, token] = 0.0
        return logits
