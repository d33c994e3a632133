"""Gate and target: the two polytopes of a steering artifact, each trained for its job.

- The **gate** decides *when* to steer. It is a detector: it reads the last prompt position
  (policy ``last_prompt``, so ``scan``/``sap eval`` work on it), is trained with the detection
  defaults (:class:`~sapguard.polytope.train.TrainConfig`: 4 linear facets, logistic loss, chosen
  by held-out-source recall, see RESULTS.md; offset calibrated to fire on 5 % of the benign
  validation prompts) on the default corpus's plain harmful and benign requests, its wrapped rows
  (ciphers, CodeAttack, long context, jailbreak collections other than those the bench holds out:
  :data:`~sapguard.data.attacks.CORPUS_OVERLAP`) and requests wrapped in the attack families
  chosen for training (the same wrappers on both sides, so the wrapper is not the concept).
- The **target** decides *where* to steer. Its rows are the model's own states at the positions
  steering edits (generated index ``0 .. first_n-1``: the last prompt position and the first
  response tokens) on trajectories labelled by behaviour, for the *same* harmful requests:
  safe = the model refusing (its own refusals, its refusals under a safety system prompt, and
  teacher-forced refusals); unsafe = the model complying. Entering the target therefore means
  moving toward refusing, not toward "looks like a benign request". Benign answers are *not*
  target rows by default (``SteeringTrainConfig.target_benign``): answering a benign request is
  compliance behaviour, and labelling it safe pulled the target back toward "benign-looking".

SafeFlow's settings are stored with the artifact (``meta["steering"]["defaults"]["safeflow"]``):
the edit is restricted to the refusal-minus-compliance direction (``basis="refusal_direction"``)
and solved to a *margin* inside the target (``SteeringTrainConfig.safeflow_margin``). Both were
chosen on validation requests of the default model (RESULTS.md, Steering): the unrestricted
minimal l1 edit reaches the target with small edits along directions the model's output does not
depend on (0 of 24 validation requests refused at any margin up to 20), and a minimal edit that
lands just inside the boundary (margin 0.5) is too weak. With the artifact of ``sap steer-train``
(layer 16) and its detector gate, margin 2 at *every* generated position turned 18 of 24
validation requests into coherent refusals with no broken text (editing only the first 8 positions
let the model drift back: 4 of 24); larger margins (4-12) break the text. The target is trained on
generated indices ``0 .. first_n-1`` and the hook applies it at every generated position
(``SteeringTrainConfig.steer_first_n=None``). How far a margin moves a state depends on the trained
target, so the margin is re-validated with every retrained artifact.

The artifact on disk (gate + ``target/``) and the attachment of the target to the gate live in
:mod:`sapguard.steer.artifact`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.steer.artifact import attach_target

if TYPE_CHECKING:
    from sapguard.data.attacks import Attack

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """One (prompt, response) trajectory and the behaviour it shows.

    Attributes:
        prompt_ids: Templated prompt token ids (system turn included when used).
        response_ids: Response token ids (at least the first ``first_n - 1`` are read).
        safe: The trajectory is safe behaviour (refusal, or an answer to a benign request).
        kind: ``own``, ``system_prompt``, ``teacher_forced`` or ``benign`` (reported in the meta).
        split: ``train`` or ``validation``.
        skip_prompt_row: Do not read the last prompt position (a teacher-forced refusal shares it
            with the model's own completion of the same prompt).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    safe: bool
    kind: str
    split: str
    skip_prompt_row: bool = False


def trajectory_states(
    lm: LoadedModel, trajectories: Sequence[Trajectory], layer: int, first_n: int, batch_size: int = 8
) -> tuple[torch.Tensor, list[int]]:
    """States at generated indices ``0 .. first_n-1`` of each trajectory (the positions steering edits).

    Generated index ``j`` is emitted by position ``len(prompt) - 1 + j`` (the hook's numbering).

    Returns:
        ``(states [rows, d] float32, trajectory index per row)``.
    """
    from sapguard.features.hooks import LayerReader, left_pad

    feats: list[torch.Tensor] = []
    owner: list[int] = []
    order = sorted(range(len(trajectories)), key=lambda i: len(trajectories[i].prompt_ids))
    with LayerReader(lm.model, layer, stop=True) as reader, torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = []
            for i in idx:
                t = trajectories[i]
                seqs.append(t.prompt_ids + t.response_ids[: max(first_n - 1, 0)])
            inputs = left_pad(seqs, lm.tokenizer.pad_token_id, lm.device)
            hidden = reader.run(**inputs)
            width = hidden.shape[1]
            for row, i in enumerate(idx):
                t = trajectories[i]
                offset = width - len(seqs[row])
                first = 1 if t.skip_prompt_row else 0
                for j in range(first, min(first_n, len(t.response_ids) + 1)):
                    pos = offset + len(t.prompt_ids) - 1 + j
                    if pos >= width:
                        break
                    feats.append(hidden[row, pos].float().cpu())
                    owner.append(i)
    if not feats:
        raise SapError("no target rows were read")
    return torch.stack(feats), owner


def behaviour_trajectories(
    lm: LoadedModel,
    harmful: Sequence[Record],
    benign: Sequence[Record],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    system_prompt: str | None = None,
    show_progress: bool = False,
) -> list[Trajectory]:
    """Label the model's own trajectories by behaviour (refusal judge) for harmful and benign requests.

    For every harmful request: its own greedy completion (safe iff a refusal), its completion
    under ``system_prompt`` (a safety system prompt; safe iff a refusal) and a teacher-forced
    refusal (safe, response positions only). Benign requests' own answers are safe.
    """
    from sapguard.models.chat import encode_prompt, resolve_template
    from sapguard.steer.dataset import REFUSALS
    from sapguard.steer.defences import SAFETY_SYSTEM_PROMPT
    from sapguard.steer.generate import generate
    from sapguard.steer.refusal import RefusalJudge

    system_prompt = SAFETY_SYSTEM_PROMPT if system_prompt is None else system_prompt
    template = resolve_template(lm.tokenizer, "auto")
    judge = RefusalJudge()
    rng = random.Random(seed)
    out: list[Trajectory] = []
    prompts = [r.prompt for r in harmful]
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "show_progress": show_progress}
    own = generate(lm, prompts + [r.prompt for r in benign], None, None, **common)  # type: ignore[arg-type]
    sys_gens = generate(lm, prompts, None, None, system=system_prompt, **common) if prompts else []  # type: ignore[arg-type]
    for rec, g, s in zip(harmful, own, sys_gens):
        split = rec.split or "train"
        ids = encode_prompt(lm.tokenizer, rec.prompt, template)
        if g.token_ids:
            out.append(Trajectory(ids, g.token_ids, judge(g.response), "own", split))
        sys_ids = encode_prompt(lm.tokenizer, rec.prompt, template, system_prompt)
        if s.token_ids:
            out.append(Trajectory(sys_ids, s.token_ids, judge(s.response), "system_prompt", split))
        refusal = lm.tokenizer.encode(rng.choice(REFUSALS), add_special_tokens=False)
        out.append(Trajectory(ids, refusal, True, "teacher_forced", split, skip_prompt_row=True))
    for rec, g in zip(benign, own[len(harmful) :]):
        if g.token_ids:
            ids = encode_prompt(lm.tokenizer, rec.prompt, template)
            out.append(Trajectory(ids, g.token_ids, True, "benign", rec.split or "train"))
    return out


def train_target(
    lm: LoadedModel,
    trajectories: Sequence[Trajectory],
    layer: int,
    first_n: int,
    *,
    train_config: Any = None,
    states: tuple[torch.Tensor, list[int]] | None = None,
    show_progress: bool = False,
) -> SafetyPolytope:
    """Train the target polytope on the states of ``trajectories`` at generated indices ``< first_n``.

    Args:
        states: Precomputed :func:`trajectory_states` output (read here when ``None``).
    """
    from sapguard.models.chat import resolve_template
    from sapguard.polytope.train import TrainConfig, train_polytope

    x, owner = states if states is not None else trajectory_states(lm, trajectories, layer, first_n)
    y = np.array([0 if trajectories[i].safe else 1 for i in owner])
    split = np.array([trajectories[i].split for i in owner])
    tr, va = split == "train", split == "validation"
    if not tr.any() or not va.any():
        raise SapError("the target needs train and validation trajectories")
    counts: dict[str, dict[str, int]] = {}
    for i in owner:
        t = trajectories[i]
        key = f"{t.kind}:{'safe' if t.safe else 'unsafe'}"
        counts.setdefault(t.split, {}).setdefault(key, 0)
        counts[t.split][key] += 1
    logger.info("target rows: %s", counts)
    meta = {
        "layer": layer,
        "policy": "last_prompt",
        "template": resolve_template(lm.tokenizer, "auto"),
        "base_model": lm.identity(),
        "role": "steering target",
        "training_data": (
            f"the model's own states at generated indices 0..{first_n - 1}: refusal trajectories (own, under a "
            "safety system prompt, teacher-forced)"
            + (" and benign answers" if any(t.kind == "benign" for t in trajectories) else "")
            + " (safe) vs compliance trajectories (unsafe) for the same harmful requests"
        ),
        "rows": counts,
        "first_n": first_n,
    }
    result = train_polytope(
        x[torch.from_numpy(tr)],
        y[tr],
        x[torch.from_numpy(va)],
        y[va],
        train_config or TrainConfig.concept_mlp(),
        meta=meta,
        show_progress=show_progress,
    )
    return result.polytope


def wrapped_records(records: Sequence[Record], attacks: Sequence[Any], seed: int = 0) -> list[Record]:
    """Each record wrapped by one attack (cycling), keeping label, group and split."""
    from dataclasses import replace

    from sapguard.data.attacks import assign

    pairs = assign([r.prompt for r in records], list(attacks))
    return [
        replace(r, prompt=text, source=f"{r.source}+{attack.kind}")
        for r, (text, attack) in zip(records, pairs)
    ]


def train_gate(
    lm: LoadedModel,
    records: Sequence[Record],
    layer: int,
    *,
    train_config: Any = None,
    views: Sequence[str] = ("prompt",),
    show_progress: bool = False,
) -> SafetyPolytope:
    """Train the gate on the last prompt position of labelled ``records`` (train/validation splits).

    Args:
        train_config: Polytope settings (default: the detection defaults, ``TrainConfig()``, whose
            offset makes the gate fire on 5 % of the benign validation rows).
        views: ``("prompt", "tail")`` also reads each prompt's last line alone
            (:mod:`sapguard.features.views`): the offset is then calibrated on the larger score of the
            two views, as the hook reads them.

    ``meta["gate_validation"]`` reports the gate's recall and benign fire rate on validation,
    plain and wrapped rows apart.
    """
    from sapguard.features.extract import extract_features
    from sapguard.features.views import TAIL_WORDS, polytope_views
    from sapguard.models.chat import resolve_template
    from sapguard.polytope.train import TrainConfig, calibrate_scores, raw_scores, train_polytope
    from sapguard.polytope.views import max_view_scores

    template = resolve_template(lm.tokenizer, "auto")
    parts = {}
    for split in ("train", "validation"):
        recs = [r for r in records if r.split == split]
        if not recs:
            raise SapError(f"the gate needs {split} records")
        x, idx, _ = extract_features(
            lm, recs, layer, policy="last_prompt", template=template, show_progress=show_progress
        )
        parts[split] = (
            x,
            np.array([0 if recs[i].is_safe else 1 for i in idx.tolist()]),
            [recs[i] for i in idx.tolist()],
        )
    meta = {
        "layer": layer,
        "policy": "last_prompt",
        "template": template,
        "base_model": lm.identity(),
        "role": "steering gate",
        "training_data": "plain default-corpus prompts + harmful and benign prompts wrapped in the training attack families",
    }
    result = train_polytope(
        parts["train"][0],
        parts["train"][1],
        parts["validation"][0],
        parts["validation"][1],
        train_config or TrainConfig(),
        train_records=parts["train"][2],
        meta=meta,
        show_progress=show_progress,
    )
    gate = result.polytope
    x_val, y_val, recs_val = parts["validation"]
    x_val_t = torch.as_tensor(x_val, dtype=torch.float32)
    with_tail = "tail" in polytope_views({"views": list(views)})[0]
    scores = max_view_scores(gate, x_val_t, recs_val, lm, layer, template) if with_tail else raw_scores(gate, x_val_t)
    if with_tail:
        calibrate_scores(gate, scores, y_val, (train_config or TrainConfig()).target_fpr)
        gate.meta.update({"views": list(views), "tail_words": TAIL_WORDS})
    fired = scores > float(gate.offset)
    wrapped = np.array([r.wrapper is not None or "+" in r.source for r in recs_val])

    def rate(mask: np.ndarray) -> float | None:
        return round(float(fired[mask].mean()), 4) if mask.any() else None

    gate.meta["gate_validation"] = {
        "recall_plain": rate((y_val == 1) & ~wrapped),
        "recall_wrapped": rate((y_val == 1) & wrapped),
        "fire_rate_benign_plain": rate((y_val == 0) & ~wrapped),
        "fire_rate_benign_wrapped": rate((y_val == 0) & wrapped),
        "rows": len(y_val),
        "views": list(views),
    }
    logger.info("gate on validation: %s", gate.meta["gate_validation"])
    return gate


@dataclass
class SteeringTrainConfig:
    """Sizes and settings of :func:`train_steering` (defaults sized for 2 CPU cores, ~35 minutes).

    Attributes:
        n_harmful, n_wrapped, n_benign: Train-split requests for the target (validation: a third).
        n_gate: Harmful and benign plain train prompts of the corpus (each) for the gate
            (validation: a third); ``None``: every one of at most ``max_chars``.
        n_gate_wrapped: Harmful and benign train prompts wrapped in the training families for the gate.
        n_gate_noise: Harmful and benign train prompts (each; validation: a third) with a random
            GCG-shaped suffix (:func:`~sapguard.data.attacks.noise_attacks`, words from the train
            split) for the gate, so that a suffix of junk does not hide a request from it.
        n_gate_corpus_wrapped: The corpus's own wrapped train rows (ciphers, CodeAttack, long
            context, jailbreak collections not in :data:`~sapguard.data.attacks.CORPUS_OVERLAP`
            unless their bench families are in ``families``) for the gate (validation: a third).
        max_chars: Longest corpus prompt used (CPU budget; wrappers come on top).
        first_n: Generated indices the target covers.
        steer_first_n: Generated indices the hook edits (stored as its ``first_n`` policy);
            ``None``: every generated position (token policy ``generated``).
        max_new_tokens: Length of the model's own completions.
        families: Attack families seen in training.
        target_benign: Also label benign answers as safe target rows (off: see the module doc).
        safeflow_margin: SafeFlow's margin inside the target, stored as the artifact's default.
        safeflow_basis: ``"refusal_direction"`` (edit along the stored direction only) or ``None``
            (unrestricted l1 edit), stored as the artifact's default.
        redirect_alpha: Redirect's scale of the stored direction, stored as the artifact's default.
        gate_views: What the gate reads (:func:`train_gate`'s ``views``): the prompt, and its last line alone.
    """

    n_harmful: int = 45
    n_wrapped: int = 15
    n_benign: int = 30
    n_gate: int | None = None
    n_gate_wrapped: int = 150
    n_gate_noise: int = 150
    n_gate_corpus_wrapped: int = 300
    max_chars: int = 400
    first_n: int = 8
    steer_first_n: int | None = None
    max_new_tokens: int = 24
    families: tuple[str, ...] = ("handwritten", "rewrite")
    target_benign: bool = False
    safeflow_margin: float = 2.0
    safeflow_basis: str | None = "refusal_direction"
    redirect_alpha: float = 2.0
    gate_views: tuple[str, ...] = ("prompt", "tail")
    seed: int = 0


Pools = dict[str, dict[str, list[Record]]]
"""Plain requests by split (``train``/``validation``) and kind (``harmful``/``benign``)."""


def request_pools(corpus: Sequence[Record], cfg: SteeringTrainConfig) -> Pools:
    """Plain train/validation requests of at most ``cfg.max_chars``, shuffled with ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    pools: Pools = {}
    for split in ("train", "validation"):
        short = [
            r for r in corpus if r.split == split and r.wrapper is None and len(r.prompt) <= cfg.max_chars
        ]
        harmful = sorted((r for r in short if not r.is_safe), key=lambda r: r.prompt)
        benign = sorted((r for r in short if r.is_safe), key=lambda r: r.prompt)
        rng.shuffle(harmful)
        rng.shuffle(benign)
        pools[split] = {"harmful": harmful, "benign": benign}
    return pools


def _take(pools: Pools, split: str, kind: str, n: int | None) -> list[Record]:
    """The first ``n`` of a pool (validation: a third); ``None``: all."""
    if n is None:
        return pools[split][kind]
    return pools[split][kind][: n if split == "train" else max(n // 3, 1)]


def gate_records(
    corpus: Sequence[Record],
    cfg: SteeringTrainConfig,
    pools: Pools | None = None,
    attacks: Sequence[Attack] | None = None,
) -> list[Record]:
    """The gate's train and validation rows (see :class:`SteeringTrainConfig` for the sizes).

    Plain requests, other plain requests wrapped in the training families (harmful and benign
    alike) and the corpus's own wrapped rows, leaving out the jailbreak collections the bench
    holds out (:data:`~sapguard.data.attacks.CORPUS_OVERLAP`) unless their families are trained on.
    ``pools`` and ``attacks`` (``families_attacks(cfg.families)``) default to those of ``cfg``.
    """
    from sapguard.data.attacks import (
        CORPUS_OVERLAP,
        UNSEEN_FAMILIES,
        corpus_words,
        families_attacks,
        noise_attacks,
    )
    from sapguard.data.augment import wrapper_family

    pools = pools or request_pools(corpus, cfg)
    attacks = families_attacks(cfg.families) if attacks is None else attacks
    excluded = set() if set(UNSEEN_FAMILIES) <= set(cfg.families) else set(CORPUS_OVERLAP)
    noise = (
        noise_attacks(64, cfg.seed, corpus_words(r.prompt for r in corpus if r.split == "train"))
        if cfg.n_gate_noise
        else []
    )
    out: list[Record] = []
    for split in ("train", "validation"):
        out += _take(pools, split, "harmful", cfg.n_gate) + _take(pools, split, "benign", cfg.n_gate)
        tail_h = pools[split]["harmful"][::-1]  # wrap other requests than the plain ones above
        tail_b = pools[split]["benign"][::-1]
        n = len(_take(pools, split, "harmful", cfg.n_gate_wrapped))
        out += wrapped_records(tail_h[:n], attacks, cfg.seed)
        out += wrapped_records(tail_b[:n], attacks, cfg.seed + 1)
        if cfg.n_gate_noise:
            m = len(_take(pools, split, "harmful", cfg.n_gate_noise))
            out += wrapped_records(tail_h[n : n + m], noise, cfg.seed)
            out += wrapped_records(tail_b[n : n + m], noise, cfg.seed + 1)
        corpus_wrapped = sorted(
            (r for r in corpus if r.split == split and r.wrapper and wrapper_family(r) not in excluded),
            key=lambda r: r.prompt,
        )
        random.Random(f"{cfg.seed}:{split}").shuffle(corpus_wrapped)
        n = cfg.n_gate_corpus_wrapped if split == "train" else cfg.n_gate_corpus_wrapped // 3
        out += corpus_wrapped[:n]
    logger.info("gate: %d records (corpus wrapper families left out: %s)", len(out), sorted(excluded))
    return out


def train_steering(
    lm: LoadedModel,
    corpus: Sequence[Record],
    layer: int,
    cfg: SteeringTrainConfig | None = None,
    *,
    show_progress: bool = False,
) -> SafetyPolytope:
    """Train a gate and a behavioural target on ``corpus`` (train/validation splits only).

    Returns:
        The gate with the target attached (save with :func:`~sapguard.steer.artifact.save_steering`). Its
        ``meta["steering"]`` holds the hook settings (``gate="prompt"``, ``first_n``), the
        refusal-minus-compliance direction of the target's train rows (``redirect`` and the
        trace's cosine) and what was trained on.
    """
    from sapguard.data.attacks import families_attacks
    from sapguard.steer.dataset import mean_direction

    cfg = cfg or SteeringTrainConfig()
    attacks = families_attacks(cfg.families)
    pools = request_pools(corpus, cfg)
    gate = train_gate(
        lm, gate_records(corpus, cfg, pools, attacks), layer, views=cfg.gate_views, show_progress=show_progress
    )

    harmful_t: list[Record] = []
    benign_t: list[Record] = []
    for split in ("train", "validation"):
        direct = _take(pools, split, "harmful", cfg.n_harmful)
        rest = pools[split]["harmful"][len(direct) :]
        harmful_t += direct + wrapped_records(
            rest[: len(_take(pools, split, "harmful", cfg.n_wrapped))], attacks, cfg.seed + 2
        )
        if cfg.target_benign:
            benign_t += _take(pools, split, "benign", cfg.n_benign)
    trajectories = behaviour_trajectories(
        lm, harmful_t, benign_t, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, show_progress=show_progress
    )
    x, owner = trajectory_states(lm, trajectories, layer, cfg.first_n)
    target = train_target(
        lm, trajectories, layer, cfg.first_n, states=(x, owner), show_progress=show_progress
    )
    train_row = torch.tensor([trajectories[i].split == "train" for i in owner])
    refusing = (
        torch.tensor([trajectories[i].safe and trajectories[i].kind != "benign" for i in owner]) & train_row
    )
    complying = torch.tensor([not trajectories[i].safe for i in owner]) & train_row
    direction = mean_direction(x, refusing, complying)
    gate.meta["steering"] = {
        "direction": [round(float(v), 5) for v in direction],
        "direction_source": "mean of refusal-trajectory states minus compliance-trajectory states (target train rows)",
        "hook": {
            "tokens": "generated" if cfg.steer_first_n is None else "first_n",
            "first_n": cfg.first_n if cfg.steer_first_n is None else cfg.steer_first_n,
            "threshold": 0.0,
            "gate": "prompt",
        },
        "defaults": {
            "safeflow": {"margin": cfg.safeflow_margin, "max_steps": 50, "basis": cfg.safeflow_basis},
            "redirect": {"alpha": cfg.redirect_alpha},
        },
        "train_families": list(cfg.families),
        "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
    }
    return attach_target(gate, target)
