"""The polytope on a *flattened* token batch: what a serving engine's decoder layer sees.

Engines with continuous batching (vLLM) run every scheduled token of every request as one
``[T, d]`` batch: prefill chunks and single decode tokens side by side, request ``i`` owning rows
``query_start_loc[i] : query_start_loc[i + 1]``. :class:`FlatGuard` reads the polytope's margins
on those rows, decides per request, edits only rows that violate (with the request's own mode),
and keeps per-request records (the prompt verdict, per-token scores, edit counts, optional feature
rows) keyed by the engine's request id. It knows nothing about vLLM; :mod:`sapguard.engines.vllm`
feeds it from a forward hook.

Positions and layer numbering follow :mod:`sapguard.steer.hook`: generated index
``g = position - (prompt_len - 1)``; ``g == 0`` is the last prompt position (it emits the first
token) and is where the request's verdict is read (the shipped detector's ``last_prompt`` policy);
``g < 0`` are the other prompt positions. Token policies and the gate scope are the steering
hook's (``prompt``, ``generated``, ``first_n``, ``all``; gate ``position`` or ``prompt``).

When no row is edited in a step, :meth:`FlatGuard.step` returns ``None`` and the engine's tensors
are untouched, so outputs are bit-identical to the engine without the hook.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sapguard.errors import SapError
from sapguard.models.layers import resolve_layer
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.hook import GATE_SCOPES, TOKEN_POLICIES, hook_settings
from sapguard.steer.modes import SteeringMode, make_mode
from sapguard.steer.solver import polytope_on

logger = logging.getLogger(__name__)

ENGINE_MODES = ("off", "detect", "safeflow", "redirect", "refuse")
"""Per-request modes: ``off`` skips the request's rows entirely; ``detect`` and ``refuse`` never
edit hidden states (``refuse`` answers with a fixed refusal when the prompt fires, see
:mod:`sapguard.engines.vllm`); ``safeflow`` and ``redirect`` edit violating rows."""

CAPTURE = (None, "last_prompt", "prompt")
"""Feature rows kept per request: none, the last prompt position, or every prompt position."""

MAX_RECORDS = 10_000
"""Records kept for requests nobody collected (oldest dropped first), so a server never grows."""

MODE_KEY = "sapguard_mode"
"""Key of the per-request mode in ``SamplingParams.extra_args`` (and ``vllm_xargs`` over HTTP)."""
CAPTURE_KEY = "sapguard_capture"
"""Key of the per-request feature capture (:data:`CAPTURE`) in ``SamplingParams.extra_args``."""
GATE_KEY = "sapguard_gate_on"
"""``extra_args[GATE_KEY] = True`` gates a request on at its prompt (a prompt-scope gate) even when
the whole prompt does not fire: set by :class:`~sapguard.engines.vllm.VLLMGuard` for prompts whose
tail view fired (:mod:`sapguard.features.views`)."""


def load_guard_polytope(spec: str | Path) -> SafetyPolytope:
    """``"default"`` (shipped detector), ``"steering"`` (shipped steering gate + target) or a directory.

    A directory is loaded with its behavioural target (``target/``) when it has one.
    """
    from sapguard.polytope.artifact import default_polytope
    from sapguard.steer.artifact import load_steering

    if str(spec) == "default":
        return default_polytope()
    if str(spec) == "steering":
        return load_steering(Path(__file__).resolve().parent.parent / "assets" / "steering")
    path = Path(spec)
    if not path.is_dir():
        raise SapError(f"polytope {spec!r}: not 'default', 'steering' or an artifact directory")
    return load_steering(path)


def available_modes(poly: SafetyPolytope) -> tuple[str, ...]:
    """Modes this polytope supports (``redirect`` needs a stored steering direction)."""
    has_direction = "direction" in (poly.meta.get("steering") or {})
    return tuple(m for m in ENGINE_MODES if m != "redirect" or has_direction)


def check_mode(mode: Any, available: Sequence[str] = ENGINE_MODES) -> str:
    """A valid mode name, else a one-line :class:`SapError`."""
    if not isinstance(mode, str) or mode not in ENGINE_MODES:
        raise SapError(f"unknown sapguard mode {mode!r}; expected one of {', '.join(ENGINE_MODES)}")
    if mode not in available:
        raise SapError(
            f"sapguard mode {mode!r} is not available for this polytope (it has no steering direction); "
            f"available: {', '.join(available)}"
        )
    return mode


@dataclass
class GuardConfig:
    """What to attach: JSON-serialisable, so it travels to engine workers without pickling code.

    Attributes:
        polytope: ``"default"``, ``"steering"`` or an artifact directory (see :func:`load_guard_polytope`).
        mode: Default mode for requests that do not name one (:data:`ENGINE_MODES`).
        layer: Override of the polytope's layer (sapguard numbering, negative allowed).
        tokens, first_n, threshold, gate: Steering hook settings; ``None``: the artifact's tuned ones.
        capture: Keep feature rows (:data:`CAPTURE`), for extraction and parity checks.
        record_tokens: Keep each request's per-token scores.
    """

    polytope: str = "default"
    mode: str = "detect"
    layer: int | None = None
    tokens: str | None = None
    first_n: int | None = None
    threshold: float | None = None
    gate: str | None = None
    capture: str | None = None
    record_tokens: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SapError(f"unknown sapguard engine option(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class RequestRecord:
    """What the polytope saw for one request (one engine request id)."""

    mode: str
    prompt_margins: list[float] | None = None
    active: bool | None = None
    max_score: float = -math.inf
    fired_tokens: int = 0
    edited_tokens: int = 0
    steps: int = 0
    first_fired: int | None = None
    scores: dict[int, float] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)

    def to_json(self, names: Sequence[str], features: bool = False) -> dict[str, Any]:
        """Plain types only (crosses process boundaries as msgpack)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "prompt_margins": dict(zip(names, self.prompt_margins)) if self.prompt_margins is not None else None,
            "prompt_score": max(self.prompt_margins) if self.prompt_margins else None,
            "gate_active": self.active,
            "max_score": self.max_score if math.isfinite(self.max_score) else None,
            "fired_tokens": self.fired_tokens,
            "edited_tokens": self.edited_tokens,
            "solver_steps": self.steps,
            "first_fired": self.first_fired,
            "token_scores": [[g, s] for g, s in sorted(self.scores.items())],
        }
        if features and self.features:
            positions = sorted(self.features)
            rows = torch.stack([self.features[p] for p in positions]).contiguous()
            out["features"] = {
                "positions": positions,
                "shape": list(rows.shape),
                "float32": rows.numpy().tobytes(),
            }
        return out


def features_from_json(payload: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """Inverse of the ``features`` entry of :meth:`RequestRecord.to_json`: positions and ``[n, d]`` rows."""
    import numpy as np

    rows = np.frombuffer(payload["float32"], dtype=np.float32).reshape(payload["shape"]).copy()
    return list(payload["positions"]), torch.from_numpy(rows)


@dataclass
class StepRequests:
    """The requests of one engine step, in row order.

    Attributes:
        req_ids: Engine request ids.
        starts: ``query_start_loc``: request ``i`` owns rows ``starts[i]:starts[i+1]`` (length n+1).
        prompt_lens: Prompt length of each request.
        modes: Mode of each request (already validated).
        captures: Feature capture of each request (:data:`CAPTURE`); ``None``: the config's.
        gated_on: Requests gated on at their prompt whatever it scores (:data:`GATE_KEY`).
    """

    req_ids: list[str]
    starts: list[int]
    prompt_lens: list[int]
    modes: list[str]
    captures: list[str | None] | None = None
    gated_on: list[bool] | None = None


class FlatGuard:
    """Per-token polytope margins and edits on a flattened ``[T, d]`` batch.

    Args:
        poly: The polytope (its target attached for SafeFlow, see :func:`load_guard_polytope`).
        config: :class:`GuardConfig` (mode names, token policy, gate, capture).
        hidden_size, num_layers: The engine model's, checked against the polytope.

    Raises:
        SapError: hidden size mismatch, layer out of range, unknown mode, policy or gate, all
            before the engine serves a token.
    """

    def __init__(self, poly: SafetyPolytope, config: GuardConfig, *, hidden_size: int, num_layers: int):
        if poly.hidden_size != hidden_size:
            raise SapError(
                f"polytope expects hidden size {poly.hidden_size}, the engine's model has {hidden_size}; "
                "use a polytope trained on this model"
            )
        layer = config.layer if config.layer is not None else poly.meta.get("layer")
        if layer is None:
            raise SapError("the polytope records no layer; pass layer=")
        self.layer = resolve_layer(int(layer), num_layers)
        self.available = available_modes(poly)
        self.default_mode = check_mode(config.mode, self.available)
        if config.capture not in CAPTURE:
            raise SapError(f"unknown capture {config.capture!r}; expected last_prompt or prompt")
        settings = hook_settings(
            poly, tokens=config.tokens, first_n=config.first_n, threshold=config.threshold, gate=config.gate
        )
        self.tokens = str(settings["tokens"])
        self.first_n = int(settings["first_n"])
        self.threshold = float(settings["threshold"])
        self.gate = str(settings["gate"])
        if self.tokens not in TOKEN_POLICIES:
            raise SapError(f"unknown token policy {self.tokens!r}; expected one of {', '.join(TOKEN_POLICIES)}")
        if self.gate not in GATE_SCOPES:
            raise SapError(f"unknown gate scope {self.gate!r}; expected one of {', '.join(GATE_SCOPES)}")
        if self.first_n < 0:
            raise SapError("first_n must be non-negative")
        self.poly = poly
        self.config = config
        self.names = poly.facet_names
        self.modes: dict[str, SteeringMode] = {m: make_mode(m, poly) for m in self.available if m != "off"}
        self.records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._poly_cache: dict[torch.device, SafetyPolytope] = {}
        self.hook_seconds = 0.0
        """Wall time spent inside the engine hook (the engine adds to it), for overhead measurements."""
        self.hook_calls = 0

    # -- helpers ---------------------------------------------------------------------------
    def capture_of(self, extra_args: dict[str, Any] | None) -> str | None:
        """The request's feature capture (``extra_args["sapguard_capture"]``), else the config's."""
        capture = (extra_args or {}).get(CAPTURE_KEY)
        return capture if capture in CAPTURE else self.config.capture

    @staticmethod
    def gated_on(extra_args: dict[str, Any] | None) -> bool:
        """Whether the request asks to be gated on at its prompt (``extra_args[GATE_KEY] is True``)."""
        return (extra_args or {}).get(GATE_KEY) is True

    def mode_of(self, extra_args: dict[str, Any] | None) -> str:
        """The request's mode: ``extra_args["sapguard_mode"]`` if valid, else the default.

        Requests are validated at admission (:mod:`sapguard.engines.vllm`); an invalid mode that
        gets here anyway is logged and served with the default, never crashes the engine.
        """
        mode = (extra_args or {}).get(MODE_KEY)
        if mode is None:
            return self.default_mode
        if mode not in self.available:
            logger.warning("request asked for sapguard mode %r; using %s", mode, self.default_mode)
            return self.default_mode
        return str(mode)

    def _poly_on(self, device: torch.device) -> SafetyPolytope:
        if device not in self._poly_cache:
            self._poly_cache[device] = polytope_on(self.poly, device)
        return self._poly_cache[device]

    def _record(self, req_id: str, mode: str) -> RequestRecord:
        rec = self.records.get(req_id)
        if rec is None:
            rec = self.records[req_id] = RequestRecord(mode=mode)
            while len(self.records) > MAX_RECORDS:
                self.records.popitem(last=False)
        return rec

    def pop(self, req_ids: Sequence[str] | None = None, *, prefix_match: bool = True, remove: bool = True) -> dict[str, RequestRecord]:
        """Records by id; ``prefix_match`` also finds engine ids ``"{id}-{suffix}"`` (vLLM's internal ids)."""
        if req_ids is None:
            found = dict(self.records)
        else:
            found = {}
            for rid in req_ids:
                if rid in self.records:
                    found[rid] = self.records[rid]
                elif prefix_match:
                    for key in list(self.records):
                        if key.startswith(f"{rid}-"):
                            found[rid] = self.records[key]
                            break
        if remove:
            for rid in list(found):
                self.records.pop(rid, None)
                for key in [k for k in self.records if k.startswith(f"{rid}-")]:
                    self.records.pop(key, None)
        return found

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, stream: torch.Tensor, positions: torch.Tensor, reqs: StepRequests) -> torch.Tensor | None:
        """Margins for the step's rows; the additive edit ``[T, d]`` (``None`` when nothing is edited).

        Args:
            stream: ``[T', d]`` residual-stream states at the layer (``T' >= starts[-1]``; rows past
                the last request, e.g. padding, are ignored).
            positions: ``[T']`` absolute position of each row in its sequence.
            reqs: Which rows belong to which request.
        """
        n = len(reqs.req_ids)
        if n == 0:
            return None
        total = reqs.starts[n]
        device = stream.device
        pos = positions[:total].to(device="cpu", dtype=torch.long)
        owner = torch.repeat_interleave(
            torch.arange(n), torch.tensor([reqs.starts[i + 1] - reqs.starts[i] for i in range(n)])
        )
        live = torch.tensor([m != "off" for m in reqs.modes], dtype=torch.bool)[owner]
        if not bool(live.any()):
            return None
        prompt_len = torch.tensor(reqs.prompt_lens, dtype=torch.long)[owner]
        gen = pos - (prompt_len - 1)
        in_prompt = gen <= 0
        emitting = gen >= 0
        if self.tokens == "prompt":
            selected = in_prompt
        elif self.tokens == "generated":
            selected = emitting
        elif self.tokens == "first_n":
            selected = emitting & (gen < self.first_n)
        else:
            selected = in_prompt | emitting
        rows = live.nonzero().flatten()
        poly = self._poly_on(device)
        h = stream[rows.to(device)].float()
        margins = poly.margins(h)
        score = margins.max(-1).values
        fired = (score > self.threshold).cpu()
        margins_cpu, score_cpu = margins.cpu(), score.cpu()
        r_owner, r_gen, r_sel, r_pos = owner[rows], gen[rows], selected[rows], pos[rows]

        # per-request bookkeeping (the verdict at g == 0, the gate, capture)
        gate_ok = fired.clone()
        for i in range(n):
            if reqs.modes[i] == "off":
                continue
            mine = (r_owner == i).nonzero().flatten()
            if len(mine) == 0:
                continue
            rec = self._record(reqs.req_ids[i], reqs.modes[i])
            g_mine = r_gen[mine]
            at0 = mine[g_mine == 0]
            if len(at0):
                rec.prompt_margins = margins_cpu[at0[0]].tolist()
                rec.active = bool(fired[at0[0]]) or bool(reqs.gated_on is not None and reqs.gated_on[i])
            if self.gate == "prompt":
                gate_ok[mine] = bool(rec.active)
            rec.max_score = max(rec.max_score, float(score_cpu[mine].max()))
            sel_fired = mine[r_sel[mine] & gate_ok[mine]]
            rec.fired_tokens += len(sel_fired)
            if len(sel_fired) and rec.first_fired is None:
                rec.first_fired = int(r_gen[sel_fired].min())
            if self.config.record_tokens:
                for j in mine[g_mine >= 0].tolist():
                    rec.scores[int(r_gen[j])] = float(score_cpu[j])
            capture = reqs.captures[i] if reqs.captures is not None else None
            capture = capture or self.config.capture
            if capture is not None:
                want = g_mine <= 0 if capture == "prompt" else g_mine == 0
                for j in mine[want].tolist():
                    rec.features[int(r_pos[j])] = h[j].detach().to("cpu", torch.float32).clone()

        # edits: selected rows of editing modes where the gate allows
        delta: torch.Tensor | None = None
        for name, mode in self.modes.items():
            if not mode.edits:
                continue
            of_mode = torch.tensor([reqs.modes[i] == name for i in range(n)], dtype=torch.bool)[r_owner]
            edit = of_mode & r_sel & (gate_ok if mode.gated else True)
            if not bool(edit.any()):
                continue
            idx = edit.nonzero().flatten()
            result = mode.edit(h[idx.to(device)], poly)
            change = result.hidden.to(h.dtype) - h[idx.to(device)]
            changed = (change != 0).any(-1).cpu()
            if not bool(changed.any()):
                continue
            if delta is None:
                delta = torch.zeros_like(stream)
            delta[rows[idx[changed]].to(device)] = change[changed.to(device)].to(stream.dtype)
            steps = result.steps.cpu()
            for k, j in enumerate(idx.tolist()):
                edited = self.records.get(reqs.req_ids[int(r_owner[j])])
                if edited is not None and bool(changed[k]):
                    edited.edited_tokens += 1
                    edited.steps += int(steps[k])
        return delta
