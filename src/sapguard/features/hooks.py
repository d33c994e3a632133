"""Forward hooks that read one layer's hidden states (and optionally stop the forward pass there)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sapguard.models.layers import block_for_layer, unwrap_hidden


class _StopForward(Exception):
    """Raised inside a hook to skip the blocks after the one we read."""


class LayerReader:
    """Capture the output of the block for ``layer`` on every forward.

    With ``stop=True`` the forward pass is aborted right after that block, so extraction never pays
    for the layers above it (use :meth:`run`, which swallows the abort).
    """

    def __init__(self, model: nn.Module, layer: int, *, stop: bool = False, path_template: str | None = None):
        self.model = model
        self.block = block_for_layer(model, layer, path_template)
        self.stop = stop
        self.hidden: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = unwrap_hidden(output).detach()
        if self.stop:
            raise _StopForward

    def __enter__(self) -> LayerReader:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def run(self, **inputs: Any) -> torch.Tensor:
        """Forward ``inputs`` through the model and return the captured hidden states."""
        self.hidden = None
        with contextlib.suppress(_StopForward):
            self.model(**inputs, use_cache=False)
        if self.hidden is None:
            raise RuntimeError("the layer hook did not fire; is the layer path right?")
        return self.hidden


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids``.

    Position ids count real tokens only, so a padded row sees the same positions as it would alone.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
