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

from typing import Any

import torch
from torch import nn

from sapguard.errors import SapError


def find_decoder_blocks(model: nn.Module, path_template: str | None = None) -> nn.ModuleList:
    """Return the model's list of decoder blocks.

    Args:
        model: A transformers causal LM (or any module holding its blocks in a ``ModuleList``).
        path_template: Explicit path such as ``"model.layers.{num}"``; by default the largest
            ``ModuleList`` in ``model.named_modules()`` is taken (Llama, Qwen2, Mistral, Gemma:
            ``model.layers``; GPT-2: ``transformer.h``).

    Raises:
        SapError: when no block list is found or the template does not resolve.
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
    best: nn.ModuleList | None = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise SapError(f"could not find decoder blocks in {type(model).__name__}; pass a layer path template")
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


def rewrap_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """Put an edited hidden-state tensor back into the same container the block returned."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden
