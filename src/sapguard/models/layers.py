"""Decoder-block discovery and the one layer numbering used everywhere in sapguard.

Layer numbering: **layer L is the output of decoder block L, counting blocks from 1**, which is
``output_hidden_states=True``'s ``hidden_states[L]`` (``hidden_states[0]`` is the embeddings).
Valid layers are ``1..n_blocks``; negative indices count from the end (``-1`` is the last block).
Features are read, and steering edits are made, at the output of 0-based block ``L - 1`` through a
forward hook, so the two always agree (the research code is off by one here).

For the last layer (``L == n_blocks``) transformers applies the final norm before storing
``hidden_states[-1]``; sapguard reads the block output itself, before that norm.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sapguard.errors import SapError

logger = logging.getLogger(__name__)


#: Last path component of the ``ModuleList`` that holds a model's decoder blocks, across the
#: families transformers ships (``model.layers``, GPT-2's ``transformer.h``, ``blocks``, T5's
#: ``block``, ``decoder.layers`` ...).
BLOCK_LIST_NAMES = frozenset({"layers", "h", "blocks", "block", "layer", "decoder_layers"})


def _expected_num_blocks(model: nn.Module) -> int | None:
    """``num_hidden_layers`` of the model's (text) config, when it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    n = getattr(text_config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _block_list_rank(name: str, blocks: nn.ModuleList, expected: int | None) -> tuple[bool, bool, bool, int]:
    """Sort key of a candidate block list: higher is more likely the decoder blocks.

    In order: not nested inside an item of another list (an MoE layer's ``mlp.experts`` lives at
    ``model.layers.3.mlp.experts`` and can hold more modules than there are blocks), named like a
    block list, as long as the config's ``num_hidden_layers``, and then simply the longest.
    """
    parts = name.split(".")
    top_level = not any(part.isdigit() for part in parts)
    return (top_level, parts[-1] in BLOCK_LIST_NAMES, len(blocks) == expected, len(blocks))


def find_decoder_blocks(model: nn.Module, path_template: str | None = None) -> nn.ModuleList:
    """Return the model's list of decoder blocks.

    By default the candidates are every non-empty ``ModuleList`` in ``model.named_modules()``,
    ranked by :func:`_block_list_rank`: lists inside a block (MoE experts, per-head modules) lose to
    the block list itself, then a conventional name (:data:`BLOCK_LIST_NAMES`) and a length equal
    to ``config.num_hidden_layers`` win, then the longest. This finds ``model.layers`` for Llama,
    Qwen2, Mistral, Gemma, Mixtral and Qwen-MoE, and ``transformer.h`` for GPT-2.

    Args:
        model: A transformers causal LM (or any module holding its blocks in a ``ModuleList``).
        path_template: Explicit path such as ``"model.layers.{num}"`` (the escape hatch for models
            the guess gets wrong); the part before ``.{num}`` must name a ``ModuleList``.

    Returns:
        The ``ModuleList`` whose item ``i`` is decoder block ``i`` (0-based).

    Raises:
        SapError: when no block list is found or the template does not resolve.

    Example:
        >>> blocks = find_decoder_blocks(lm.model)  # doctest: +SKIP
        >>> blocks = find_decoder_blocks(lm.model, "model.language_model.layers.{num}")  # doctest: +SKIP
    """
    if path_template is not None:
        prefix = path_template.split(".{num}")[0]
        try:
            blocks = model.get_submodule(prefix)
        except AttributeError:
            raise SapError(f"layer path {path_template!r} does not exist in {type(model).__name__}") from None
        if not isinstance(blocks, nn.ModuleList):
            raise SapError(f"layer path {path_template!r} is not a ModuleList of decoder blocks")
        return blocks
    expected = _expected_num_blocks(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if not candidates:
        raise SapError(f"could not find decoder blocks in {type(model).__name__}; pass a layer path template")
    name, best = max(candidates, key=lambda c: _block_list_rank(c[0], c[1], expected))
    logger.debug("decoder blocks of %s: %s (%d blocks)", type(model).__name__, name, len(best))
    return best


def resolve_layer(layer: int, num_blocks: int) -> int:
    """Normalise a possibly negative layer number to ``1..num_blocks``.

    Raises:
        SapError: for a layer out of range (including 0, the embeddings, which has no block).
    """
    resolved = num_blocks + 1 + layer if layer < 0 else layer
    if not 1 <= resolved <= num_blocks:
        raise SapError(
            f"layer {layer} is out of range for a model with {num_blocks} decoder blocks "
            f"(valid: 1..{num_blocks} or -{num_blocks}..-1)"
        )
    return resolved


def block_for_layer(model: nn.Module, layer: int, path_template: str | None = None) -> nn.Module:
    """The decoder block whose output is layer ``layer`` (see module docstring)."""
    blocks = find_decoder_blocks(model, path_template)
    return blocks[resolve_layer(layer, len(blocks)) - 1]


def unwrap_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's output, whether it is a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def rewrap_hidden(output: Any, hidden: torch.Tensor) -> torch.Tensor | tuple[Any, ...]:
    """Put an edited hidden-state tensor back into the same container the block returned."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden
