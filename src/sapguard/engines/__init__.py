"""Serving-engine backends: the polytope on an engine's own forward pass.

- :mod:`sapguard.engines.flat`: the engine-agnostic core (margins, verdicts and edits on a
  flattened token batch with per-request modes).
- :mod:`sapguard.engines.vllm`: vLLM (worker extension, offline :class:`~sapguard.engines.vllm.VLLMGuard`),
  :mod:`sapguard.engines.vllm_logits` (admission checks, ``refuse``) and
  :mod:`sapguard.engines.vllm_plugin` (``vllm serve``). Needs the ``vllm`` extra, installed in its
  own environment (``make vllm-env``).
"""
