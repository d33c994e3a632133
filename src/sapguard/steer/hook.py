"""The steering hook: a forward hook on the decoder block of the polytope's layer.

Layer numbering is the extraction one (:mod:`sapguard.models.layers`): a polytope for layer L
edits the output of block ``L - 1`` (0-based), which is what ``hidden_states[L]`` reads.

Positions and the KV cache: the first forward of a sequence (the prefill) sees every prompt
position; with a cache each later forward sees one new position. The *emitting* position of a
call is its last one (it produces the next token); generated-token index 0 is the last prompt
position. Token policies select which positions may be edited:

- ``prompt``: every prompt position (prefill only, including the last one);
- ``generated``: every emitting position (last prompt position, then each new position);
- ``first_n``: the first ``first_n`` emitting positions (paper default 20);
- ``all``: both.

Pad positions (``attention_mask == 0``) are never read into decisions nor edited. Without a KV
cache (``use_cache=False``) every call re-runs the whole sequence; a call whose input starts with
the previous prompt is recognised as a continuation, positions keep their absolute generated
index, and every selected position is edited again (deterministically the same edit), so cache
and no-cache generation edit the same positions.

Gate scope: with ``gate="position"`` the polytope decides at every selected position; with
``gate="prompt"`` it decides once per row at the last prompt position (generated index 0) and the
row's selected positions are then handed to the mode, which edits only states outside its own
target (SafeFlow with a behavioural target: the gate says *when*, the target says *where*). The
trace's ``fired`` is then the row's decision at every position. ``forced_rows`` (a ``[B]`` mask set
after :meth:`SteeringHook.reset`) gates rows on as well: :func:`~sapguard.steer.generate.generate`
sets it to the rows whose tail view the gate flags (:mod:`sapguard.features.views`). A position is edited only when the polytope fires there (for gated modes): if nothing
fires in a call, the block's output object is returned untouched, so the model's outputs are
bit-identical to the unsteered model's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sapguard.errors import SapError
from sapguard.models.layers import block_for_layer, rewrap_hidden, unwrap_hidden
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.modes import SteeringMode
from sapguard.steer.solver import polytope_on
from sapguard.steer.trace import TraceStep

logger = logging.getLogger(__name__)

TOKEN_POLICIES = ("prompt", "generated", "first_n", "all")
GATE_SCOPES = ("position", "prompt")

HOOK_DEFAULTS: dict[str, Any] = {"tokens": "first_n", "first_n": 20, "threshold": 0.0, "gate": "position"}
"""The paper's settings, used when neither the caller nor the polytope says otherwise."""


def hook_settings(poly: SafetyPolytope, **given: Any) -> dict[str, Any]:
    """Token policy, first_n, threshold and gate scope: explicit values, else the polytope's tuned ones, else the paper's."""
    stored = (poly.meta.get("steering") or {}).get("hook") or {}
    return {
        k: given[k] if given.get(k) is not None else stored.get(k, default)
        for k, default in HOOK_DEFAULTS.items()
    }


class SteeringHook:
    """Hooks that steer one model with one polytope. Use as a context manager or call :meth:`remove`.

    Args:
        model: The causal LM (a transformers ``PreTrainedModel``).
        poly: The polytope; its ``meta["layer"]`` picks the block unless ``layer`` is given.
        mode: A :class:`~sapguard.steer.modes.SteeringMode`.
        tokens: Token policy (:data:`TOKEN_POLICIES`); ``None``: the artifact's tuned one, else first_n.
        first_n: Number of generated tokens for ``first_n`` (``None``: tuned, else 20).
        threshold: A position fires when its max margin exceeds this value (``None``: tuned, else 0).
        gate: ``"position"`` or ``"prompt"`` (see the module doc; ``None``: tuned, else position).
        layer: Override of the layer.
        path_template: Explicit decoder-block path, e.g. ``"model.layers.{num}"``.

    Attributes:
        trace: One :class:`TraceStep` per forward call since the last :meth:`reset`.
        edited_positions, total_steps: Running counters (for cost measurements).

    Example:
        >>> with SteeringHook(lm.model, poly, SafeFlow()) as hook:  # doctest: +SKIP
        ...     out = lm.model.generate(**inputs, max_new_tokens=20)
        >>> hook.trace[0].margins.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        poly: SafetyPolytope,
        mode: SteeringMode,
        *,
        tokens: str | None = None,
        first_n: int | None = None,
        threshold: float | None = None,
        gate: str | None = None,
        layer: int | None = None,
        path_template: str | None = None,
    ):
        settings = hook_settings(poly, tokens=tokens, first_n=first_n, threshold=threshold, gate=gate)
        tokens, first_n, threshold, gate = (
            str(settings["tokens"]),
            int(settings["first_n"]),
            float(settings["threshold"]),
            str(settings["gate"]),
        )
        if gate not in GATE_SCOPES:
            raise SapError(f"unknown gate scope {gate!r}; expected one of {', '.join(GATE_SCOPES)}")
        if tokens not in TOKEN_POLICIES:
            raise SapError(f"unknown token policy {tokens!r}; expected one of {', '.join(TOKEN_POLICIES)}")
        if first_n < 0:
            raise SapError("first_n must be non-negative")
        layer = layer if layer is not None else poly.meta.get("layer")
        if layer is None:
            raise SapError("the polytope records no layer; pass layer=")
        self.model = model
        self.poly = poly
        self.mode = mode
        self.tokens = tokens
        self.first_n = first_n
        self.threshold = threshold
        self.gate = gate
        self.block = block_for_layer(model, int(layer), path_template)
        self.trace: list[TraceStep] = []
        self.fired_rows: torch.Tensor | None = None
        self.edited_positions = 0
        self.total_steps = 0
        self._poly_cache: dict[torch.device, SafetyPolytope] = {}
        self._attention_mask: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        self._prompt_ids: torch.Tensor | None = None
        self._row_active: torch.Tensor | None = None
        self.forced_rows: torch.Tensor | None = None
        self._direction: torch.Tensor | None = None
        self._cache_start: int | None = None
        self._prompt_width = 0
        self._seen = 0
        self._handles: list[Any] = []
        self.install()

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> None:
        """Register the hooks (done by the constructor)."""
        if self._handles:
            return
        self._handles = [
            self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            self.block.register_forward_hook(self._hook),
        ]

    def remove(self) -> None:
        """Remove the hooks; the model is back to its original behaviour."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Clear the trace and the per-generation state before a new generation."""
        self.trace = []
        self._prompt_ids = None
        self._row_active = None
        self.fired_rows = None
        self.forced_rows = None

    def __enter__(self) -> SteeringHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- hook bodies -----------------------------------------------------------------------
    def _capture_inputs(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._attention_mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, torch.Tensor) else None
        cache_position = kwargs.get("cache_position")
        self._cache_start = (
            int(cache_position.reshape(-1)[0]) if isinstance(cache_position, torch.Tensor) else None
        )

    def _poly_on(self, device: torch.device) -> SafetyPolytope:
        if device not in self._poly_cache:
            self._poly_cache[device] = polytope_on(self.poly, device)
        return self._poly_cache[device]

    def _continuation(self, width: int) -> bool:
        """A no-cache call that re-runs the previous prompt plus generated tokens."""
        ids, prev = self._input_ids, self._prompt_ids
        if ids is None or prev is None or width <= prev.shape[1] or ids.shape[0] != prev.shape[0]:
            return False
        return bool(torch.equal(ids[:, : prev.shape[1]].to(prev.device), prev))

    def _positions(
        self, batch: int, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Selected ``[B, T]`` mask, real-token mask and the generated index ``[T]`` of each position."""
        start = self._cache_start if self._cache_start is not None else (0 if width > 1 else self._seen)
        prefill = start == 0 and not self._continuation(width)
        if prefill:
            self._prompt_width = width
            self._row_active = None
            ids = self._input_ids
            self._prompt_ids = ids.detach().clone() if ids is not None and ids.shape[-1] == width else None
        self._seen = start + width
        gen = torch.arange(start, start + width, device=device) - (self._prompt_width - 1)
        in_prompt = gen <= 0 if start == 0 else torch.zeros_like(gen, dtype=torch.bool)
        emitting = gen >= 0
        if self.tokens == "prompt":
            sel = in_prompt
        elif self.tokens == "generated":
            sel = emitting
        elif self.tokens == "first_n":
            sel = emitting & (gen < self.first_n)
        else:
            sel = in_prompt | emitting
        real = torch.ones(batch, width, dtype=torch.bool, device=device)
        mask = self._attention_mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= width:
            real = mask[:, -width:].to(device).bool()
        return sel[None, :].expand(batch, width) & real, real, gen

    def _direction_on(self, device: torch.device) -> torch.Tensor | None:
        direction = (self.poly.meta.get("steering") or {}).get("direction")
        if direction is None:
            return None
        if self._direction is None or self._direction.device != device:
            self._direction = torch.tensor(direction, dtype=torch.float32, device=device)
        return self._direction

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = unwrap_hidden(output)
        batch, width, _ = hidden.shape
        selected, real, gen = self._positions(batch, width, hidden.device)
        gen_last = int(gen[-1])
        need = selected.clone()
        need[:, -1] |= real[:, -1]
        if self.gate == "prompt":
            need[:, gen == 0] |= real[:, gen == 0]
        rows, cols = need.nonzero(as_tuple=True)
        poly = self._poly_on(hidden.device)
        h = hidden[rows, cols].float()
        margins = poly.margins(h)
        fired = margins.max(-1).values > self.threshold
        if self.gate == "prompt":
            decide = gen[cols] == 0
            if bool(decide.any()):
                active = torch.zeros(batch, dtype=torch.bool, device=h.device)
                active[rows[decide]] = fired[decide]
                if self.forced_rows is not None:  # rows whose tail view fired (generate() reads it)
                    active |= self.forced_rows.to(h.device)
                self._row_active = active
            gate_ok = self._row_active[rows] if self._row_active is not None else torch.zeros_like(fired)
        else:
            gate_ok = fired
        fired_now = torch.zeros(batch, dtype=torch.bool, device=h.device)
        fired_now[rows[gate_ok & selected[rows, cols]]] = True
        self.fired_rows = (
            fired_now
            if self.fired_rows is None or len(self.fired_rows) != batch
            else self.fired_rows | fired_now
        )
        new_h = h
        steps = torch.zeros(len(h), dtype=torch.long, device=h.device)
        failed = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        edit = selected[rows, cols] & (gate_ok if self.mode.gated else True) & self.mode.edits
        if bool(edit.any()):
            result = self.mode.edit(h[edit], poly)
            new_h = h.clone()
            new_h[edit] = result.hidden.to(h.dtype)
            steps[edit] = result.steps
            failed[edit] = result.failed
            edit = edit & (new_h != h).any(-1)
            self.edited_positions += int(edit.sum())
            self.total_steps += int(result.steps.sum())
        self._record(
            batch,
            rows,
            cols,
            width,
            gen_last,
            margins,
            gate_ok if self.gate == "prompt" else fired,
            selected[rows, cols],
            edit,
            h,
            new_h,
            steps,
            failed,
            poly,
        )
        if not bool(edit.any()):
            return None
        edited_hidden = hidden.clone()
        edited_hidden[rows[edit], cols[edit]] = new_h[edit].to(hidden.dtype)
        return rewrap_hidden(output, edited_hidden)

    def _record(
        self,
        batch: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
        width: int,
        gen_last: int,
        margins: torch.Tensor,
        fired: torch.Tensor,
        chosen: torch.Tensor,
        edit: torch.Tensor,
        h: torch.Tensor,
        new_h: torch.Tensor,
        steps: torch.Tensor,
        failed: torch.Tensor,
        poly: SafetyPolytope,
    ) -> None:
        k = margins.shape[-1]
        last = cols == width - 1
        r = rows[last].cpu()
        out_m = torch.full((batch, k), float("nan"))
        out_m[r] = margins[last].cpu()
        after = out_m.max(-1).values.clone()
        if bool(edit[last].any()):
            e = last & edit
            constraints = getattr(self.mode, "constraints", None)
            solved = constraints(poly, new_h.device)[0] if constraints is not None else poly
            after[rows[e].cpu()] = solved.margins(new_h[e]).max(-1).values.cpu()

        def pick(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            out = torch.zeros(batch, dtype=dtype)
            out[r] = t[last].cpu().to(dtype)
            return out

        direction = self._direction_on(h.device)
        if direction is not None:
            cosine = torch.nn.functional.cosine_similarity(new_h - h, direction[None, :], dim=-1)
            cosine = torch.where(edit, cosine, torch.zeros_like(cosine))
        else:
            cosine = torch.zeros(len(h), device=h.device)
        step = TraceStep(
            gen_index=gen_last,
            edit_cosine=pick(cosine, torch.float32),
            margins=out_m,
            fired=pick(fired, torch.bool),
            steered=pick(chosen, torch.bool),
            edited=pick(edit, torch.bool),
            edit_norm=pick((new_h - h).norm(dim=-1), torch.float32),
            steps=pick(steps, torch.long),
            failed=pick(failed, torch.bool),
            margin_after=after,
        )
        if gen_last == 0:
            early = ~last
            step.prompt_fired = torch.zeros(batch, dtype=torch.bool)
            step.prompt_edited = torch.zeros(batch, dtype=torch.long)
            if bool(early.any()):
                step.prompt_fired.index_put_(
                    (rows[early & fired & chosen].cpu(),), torch.tensor(True), accumulate=False
                )
                step.prompt_edited.index_add_(
                    0, rows[early & edit].cpu(), torch.ones(int((early & edit).sum()), dtype=torch.long)
                )
        self.trace.append(step)


@contextlib.contextmanager
def steer(
    model: Any, poly: SafetyPolytope, mode: str | SteeringMode = "safeflow", **options: Any
) -> Iterator[SteeringHook]:
    """Context manager form of :class:`SteeringHook`; the hooks are always removed.

    Args:
        model: A transformers causal LM or a :class:`~sapguard.models.loading.LoadedModel`.
        poly: The polytope.
        mode: A mode name (built by :func:`~sapguard.steer.modes.make_mode` with the artifact's
            tuned defaults) or a mode object.
        **options: ``tokens``, ``first_n``, ``threshold`` (default: the artifact's tuned ones),
            ``layer``, ``path_template``.

    Example:
        >>> with steer(lm.model, poly, "redirect") as hook:  # doctest: +SKIP
        ...     lm.model.generate(**inputs)
    """
    from sapguard.steer.modes import make_mode

    module = (
        model.model
        if hasattr(model, "tokenizer") and isinstance(getattr(model, "model", None), nn.Module)
        else model
    )
    mode_obj = make_mode(mode, poly) if isinstance(mode, str) else mode
    settings = hook_settings(poly, **{k: options.pop(k, None) for k in HOOK_DEFAULTS})
    hook = SteeringHook(module, poly, mode_obj, **settings, **options)
    try:
        yield hook
    finally:
        hook.remove()
