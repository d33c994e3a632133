"""Batched, guarded decoding for the server: one forward per step for the whole batch.

The steering hook (:func:`sapguard.steer.hook.steer`) sits on the polytope's block for the
whole batch; after every forward its last trace step says, for each row, whether the polytope
fired at the emitting position and whether the mode edited it. That is the only coupling to
:mod:`sapguard.steer`: no second model pass and no re-scan of the text.

Token release: the state that reads generated token ``t_i`` is computed by the forward that
produces ``t_{i+1}``. A token is released to the client only after that forward has been
checked, so in ``refuse`` mode a token on which the polytope fires is withheld and the stream
ends with ``finish_reason="content_filter"`` (a row ended by ``max_tokens`` takes one extra
forward for this check). When the polytope fires on the prompt, ``refuse`` answers with the
refusal text. Other modes report firings in the ``sapguard`` object and go on (steered or not).

Batches are left-padded with position ids counting real tokens only (as ``generate`` does);
finished, cancelled or timed-out rows are dropped from the batch and the KV cache at once (when
the hook's gate keeps no per-row state; otherwise they ride along as masked padding).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sapguard.features.hooks import left_pad
from sapguard.models.chat import resolve_template
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.generate import gate_fires
from sapguard.steer.hook import SteeringHook, hook_settings, steer
from sapguard.steer.modes import SteeringMode

logger = logging.getLogger(__name__)


# -- events sent from the worker to the request handler ------------------------------------------
@dataclass
class TextDelta:
    text: str
    tokens: int


@dataclass
class Finished:
    reason: str
    content: str
    completion_tokens: int
    info: dict[str, Any]


@dataclass
class Failed:
    status: int
    message: str
    type: str = "server_error"


Event = TextDelta | Finished | Failed


@dataclass
class ChatJob:
    """One chat completion request as the worker sees it."""

    ids: list[int]
    max_tokens: int
    mode: str
    emit: Callable[[Event], None]
    deadline: float
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # decoding state
    released: list[int] = field(default_factory=list)
    pending: int | None = None
    sent: str = ""
    done: bool = False
    generator: torch.Generator | None = None
    tail: str | None = None  # the last user message's tail view, when the polytope reads one
    prompt_fired: bool = False
    facet_counts: dict[str, int] = field(default_factory=dict)
    max_margin: float = float("-inf")
    edited: int = 0

    def cancel(self) -> None:
        """Ask the worker to drop this request (client gone); safe from any thread."""
        self.cancelled.set()

    def info(self, content_filter: bool = False, stopped_at: int | None = None) -> dict[str, Any]:
        names = sorted(self.facet_counts, key=lambda n: -self.facet_counts[n])
        return {
            "mode": self.mode,
            "fired": bool(self.facet_counts) or self.prompt_fired,
            "prompt_fired": self.prompt_fired,
            "fired_facets": names,
            "facet_counts": dict(self.facet_counts),
            "max_margin": self.max_margin if self.max_margin > float("-inf") else None,
            "edited_tokens": self.edited,
            "content_filter": content_filter,
            "stopped_at": stopped_at,
        }


class Decoder:
    """Runs batches of :class:`ChatJob` on one model with one polytope.

    Args:
        lm: The base model.
        poly: The polytope.
        modes: Mode objects by server mode name (``refuse`` and ``detect`` are trace-only).
        hook_options: ``tokens``, ``first_n``, ``threshold`` for the hook (``None``: the artifact's).
        refusal_text: The answer when ``refuse`` fires on the prompt.
        eos: Token ids that end a response.
    """

    def __init__(
        self,
        lm: LoadedModel,
        poly: SafetyPolytope,
        modes: dict[str, SteeringMode],
        hook_options: dict[str, Any],
        refusal_text: str,
        eos: set[int],
        on_facet: Callable[[str], None] | None = None,
    ):
        self.lm = lm
        self.poly = poly
        self.modes = modes
        self.hook_options = hook_options
        self.refusal_text = refusal_text
        self.eos = eos
        self.on_facet = on_facet or (lambda name: None)
        self.names = poly.facet_names

    def run(self, jobs: list[ChatJob], between_steps: Callable[[SteeringHook], None] | None = None) -> None:
        """Decode ``jobs`` (all in the same mode) to the end; every job gets exactly one final event."""
        mode = jobs[0].mode
        model = self.lm.model
        device = self.lm.device
        for job in jobs:
            if job.temperature > 0:
                job.generator = torch.Generator(device="cpu")
                job.generator.manual_seed(job.seed if job.seed is not None else int(torch.seed() % 2**63))
        seqs = [list(j.ids) for j in jobs]
        if max(len(s) for s in seqs) < 2:  # the hook tells prefill from decode by width
            seqs[0] = [self.lm.tokenizer.pad_token_id] + seqs[0]
        inputs = left_pad(seqs, self.lm.tokenizer.pad_token_id, device)
        if len(jobs[0].ids) < 2 and len(seqs[0]) == 2:
            inputs["attention_mask"][0, 0] = 0
        attn = inputs["attention_mask"]
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
        rows: list[ChatJob | None] = list(jobs)  # batch row -> job; None once the row is done
        pad = self.lm.tokenizer.pad_token_id
        forced = self._tail_fired(jobs)  # before the hook is installed: this forward is not steered
        with steer(model, self.poly, self.modes[mode], **self.hook_options) as hook:
            hook.forced_rows = forced
            # The default gate decides per position and keeps no per-row state, so finished rows can
            # leave the batch (and the KV cache); otherwise they stay as masked padding to the end.
            prune = getattr(hook, "gate", "position") == "position"
            out = model(
                input_ids=inputs["input_ids"], attention_mask=attn, position_ids=positions,
                use_cache=True, logits_to_keep=1,
            )
            cache = out.past_key_values
            step_index = 0
            while True:
                trace = hook.trace[-1]
                hook.trace.clear()
                logits = out.logits[:, -1, :].float()
                next_tokens: list[int] = []
                for row, entry in enumerate(rows):
                    token = None if entry is None else self._advance(entry, row, step_index, trace, logits[row],
                                                                      hook.threshold)
                    if token is None:
                        rows[row] = None
                    next_tokens.append(pad if token is None else token)
                live = [i for i, entry in enumerate(rows) if entry is not None]
                if not live:
                    return
                if prune and len(live) < len(rows):
                    index = torch.tensor(live, device=device)
                    cache.batch_select_indices(index)
                    attn, positions = attn[index], positions[index]
                    rows = [rows[i] for i in live]
                    next_tokens = [next_tokens[i] for i in live]
                if between_steps is not None:
                    between_steps(hook)
                alive = torch.tensor([entry is not None for entry in rows], device=device, dtype=attn.dtype)
                attn = torch.cat([attn, alive[:, None]], dim=1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=torch.tensor(next_tokens, device=device)[:, None], attention_mask=attn,
                    position_ids=positions, past_key_values=cache, use_cache=True,
                )
                step_index += 1

    def _tail_fired(self, jobs: list[ChatJob]) -> torch.Tensor | None:
        """Rows whose tail view the gate flags (a prompt-scope gate only; see ``steer.generate``)."""
        settings = hook_settings(self.poly, **self.hook_options)
        if settings["gate"] != "prompt" or not any(j.tail for j in jobs):
            return None
        template = resolve_template(self.lm.tokenizer, str(self.poly.meta.get("template", "auto")))
        return gate_fires(self.lm, self.poly, [j.tail for j in jobs], template, float(settings["threshold"]))

    # -- one row, one step ------------------------------------------------------------------
    def _advance(
        self, job: ChatJob, row: int, step: int, trace: Any, logits: torch.Tensor, threshold: float
    ) -> int | None:
        """Inspect the trace, release the pending token, sample the next one; ``None`` ends the row."""
        if job.cancelled.is_set():
            return None
        if time.monotonic() > job.deadline:
            job.emit(Failed(504, "the request timed out", "timeout"))
            return None
        margins = trace.margins[row]
        fired = bool(trace.fired[row])
        job.max_margin = max(job.max_margin, float(margins.max()))
        job.edited += int(bool(trace.edited[row]))
        if step == 0:  # the prefill: earlier prompt positions, then the last one (which emits token 0)
            earlier = trace.prompt_fired is not None and bool(trace.prompt_fired[row])
            job.prompt_fired = earlier or fired
            job.edited += int(trace.prompt_edited[row]) if trace.prompt_edited is not None else 0
        if fired:
            for k in (margins > threshold).nonzero().flatten().tolist():
                name = self.names[k]
                job.facet_counts[name] = job.facet_counts.get(name, 0) + 1
                self.on_facet(name)
        earlier_prompt = step == 0 and trace.prompt_fired is not None and bool(trace.prompt_fired[row])
        stop_here = job.mode == "refuse" and ((fired and bool(trace.steered[row])) or earlier_prompt)
        if stop_here:
            if not job.released:
                job.emit(TextDelta(self.refusal_text, 0))
                job.sent = self.refusal_text
            self._finish(job, "content_filter", content_filter=True, stopped_at=len(job.released))
            return None
        if job.pending is not None:
            job.released.append(job.pending)
            job.pending = None
            if self._release_text(job):
                return None
        if len(job.released) >= job.max_tokens:
            self._finish(job, "length")
            return None
        token = self._sample(job, logits)
        if token in self.eos:
            self._finish(job, "stop")
            return None
        job.pending = token
        return token

    def _sample(self, job: ChatJob, logits: torch.Tensor) -> int:
        if job.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > job.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _release_text(self, job: ChatJob) -> bool:
        """Send newly decoded text, holding back a possible stop-string prefix; True when a stop string ended it."""
        text = self.lm.tokenizer.decode(job.released, skip_special_tokens=True)
        for s in job.stop:
            at = text.find(s, max(0, len(job.sent) - len(s)))
            if at >= 0:
                self._send(job, text[:at])
                self._finish(job, "stop", flush=False)
                return True
        end = len(text)
        while end > len(job.sent) and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
        for s in job.stop:
            for n in range(min(len(s) - 1, end - len(job.sent)), 0, -1):
                if text[end - n:end] == s[:n]:
                    end -= n
                    break
        self._send(job, text[:end])
        return False

    def _send(self, job: ChatJob, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit(TextDelta(text[len(job.sent):], len(job.released)))
            job.sent = text

    def _finish(
        self, job: ChatJob, reason: str, *, content_filter: bool = False, stopped_at: int | None = None,
        flush: bool = True,
    ) -> None:
        if flush and reason != "content_filter" and job.released:
            self._send(job, self.lm.tokenizer.decode(job.released, skip_special_tokens=True))
        job.done = True
        job.emit(Finished(reason, job.sent, len(job.released), job.info(content_filter, stopped_at)))
