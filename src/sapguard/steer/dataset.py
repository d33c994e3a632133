"""The generation-time steering training set and the steering polytope trained on it.

Rows (all read at every response token, policy ``response_tokens``):

- harmful prompts with the default model's own greedy completion: unsafe (a completion that the
  refusal judge marks as a refusal is kept as safe instead);
- the same harmful prompts with a hand-written refusal, teacher-forced: safe;
- benign prompts (everyday, FreshQA, curated edgy-benign) with the model's answer: safe.

Splits come from the default corpus (by prompt group), so every token row of one prompt stays in
one split; the corpus test split is never used here (the benchmark uses it). Completions stop at
end-of-sequence, so no token after EOS is ever a row.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapguard.bench.judges import RefusalJudge
from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.models.loading import LoadedModel

logger = logging.getLogger(__name__)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. If you have another question, I'm happy to help.",
    "I'm not able to provide that information because it could cause real harm.",
    "I won't assist with this. It could hurt people.",
    "Sorry, I can't do that. Is there something else I can help you with?",
    "I cannot provide instructions for that. It is dangerous and may be illegal.",
    "I'm unable to help with this request.",
    "That's not something I can help with, as it could put people at risk.",
    "I must decline. Helping with this could lead to serious harm.",
    "I can't assist with that, but I can point you to safer resources if you need support.",
    "I'm sorry, I cannot fulfil this request.",
    "No, I won't help with that. It's harmful and against my guidelines.",
    "I apologize, but I can't provide guidance on this topic.",
    "I can't create that content. It could be used to harm others.",
    "This request asks for something harmful, so I have to refuse.",
    "I'm not going to help with that. If you're in a difficult situation, please reach out to someone you trust.",
    "As an AI assistant, I can't help with illegal or dangerous activities.",
    "I can't give you that. Let me know if there's something else you'd like to talk about.",
    "I'm sorry, but providing this would be unsafe and unethical.",
    "I cannot help plan or carry out anything that could hurt someone.",
    "Unfortunately, I can't help with that request.",
    "I'd rather not help with this, because it could cause harm. Can I help with something else?",
    "I'm unable to write that. It promotes harm.",
    "I can't support this request. Please consider the consequences for the people involved.",
    "I won't provide that information.",
    "Sorry, that's not something I'm able to do.",
    "I cannot comply with this request because it could facilitate harm.",
    "I'm afraid I can't help with that one.",
    "It would be irresponsible for me to help with that, so I won't.",
    "I can't help you do that, but if you want, I can explain why it's risky and what safer options exist.",
)
"""Teacher-forced refusals: varied openings, lengths and justifications, so the polytope learns
"refusing" rather than one sentence."""

DEFAULT_MODEL_STEERING = {
    "hook": {"tokens": "first_n", "first_n": 1, "threshold": -0.4},
    "defaults": {"redirect": {"alpha": 3.0}, "safeflow": {"margin": 10.0, "max_steps": 200, "lr": 0.3}},
}
"""Hook settings and mode defaults tuned on validation prompts for the default model at layer 20
(see docs/STEERING.md); other models need their own tuning."""

BENIGN_SOURCES = ("sapguard/curated", "sapguard/curated-everyday", "inspect_evals/freshqa")


def select_prompts(
    corpus: Sequence[Record], split: str, n_harmful: int, n_benign: int, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Harmful and benign prompts of one corpus split, sampled reproducibly (benign: mixed sources)."""
    if split == "test":
        raise SapError("the steering set never uses the test split")
    rng = random.Random(seed)
    harmful = [r for r in corpus if not r.is_safe and r.split == split]
    benign = [r for r in corpus if r.is_safe and r.split == split and r.source in BENIGN_SOURCES]
    rng.shuffle(harmful)
    rng.shuffle(benign)
    return harmful[:n_harmful], benign[:n_benign]


def build_steering_records(
    lm: LoadedModel,
    corpus: Sequence[Record],
    *,
    sizes: dict[str, tuple[int, int]] | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = False,
) -> list[Record]:
    """Build the labelled (prompt, response) records of the steering set.

    Args:
        lm: The model whose own completions are used (the default model for the default set).
        corpus: Labelled prompts with splits (:func:`sapguard.data.default_corpus.build_default_corpus`).
        sizes: ``{split: (n_harmful, n_benign)}``; default train (120, 120), validation (40, 40).
        max_new_tokens: Length of the model's completions.
    """
    from sapguard.steer.generate import generate

    sizes = sizes or {"train": (120, 120), "validation": (40, 40)}
    judge = RefusalJudge()
    rng = random.Random(seed)
    records: list[Record] = []
    for split, (n_harmful, n_benign) in sizes.items():
        harmful, benign = select_prompts(corpus, split, n_harmful, n_benign, seed)
        prompts = [r.prompt for r in harmful + benign]
        gens = generate(
            lm,
            prompts,
            None,
            None,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        self_refused = 0
        for rec, gen in zip(harmful, gens[: len(harmful)]):
            group = rec.group or rec.key
            refused = judge(gen.response)
            self_refused += refused
            if gen.response.strip():
                records.append(
                    Record(
                        rec.prompt,
                        gen.response,
                        refused,
                        rec.categories,
                        "steer/own-completion",
                        group,
                        split,
                    )
                )
            records.append(Record(rec.prompt, rng.choice(REFUSALS), True, (), "steer/refusal", group, split))
        for rec, gen in zip(benign, gens[len(harmful) :]):
            if gen.response.strip():
                records.append(
                    Record(
                        rec.prompt, gen.response, True, (), "steer/benign-answer", rec.group or rec.key, split
                    )
                )
        logger.info(
            "%s: %d harmful (%d self-refused), %d benign", split, len(harmful), self_refused, len(benign)
        )
    return records


def mean_direction(x: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``mean(x[positive]) - mean(x[negative])`` as a ``[d]`` float32 tensor."""
    if not bool(positive.any()) or not bool(negative.any()):
        raise SapError("a mean-difference direction needs rows on both sides")
    return (x[positive].float().mean(0) - x[negative].float().mean(0)).float()


def train_steering_polytope(
    lm: LoadedModel,
    records: Sequence[Record],
    layer: int,
    *,
    features_dir: str | Path | None = None,
    prompt_records: Sequence[Record] | None = None,
    prompt_repeat: int = 8,
    train_config: Any = None,
    template: str = "auto",
    show_progress: bool = False,
) -> Any:
    """Extract response-token features of ``records`` at ``layer`` and train a steering polytope.

    The artifact's meta records ``layer``, ``policy`` (``response_tokens``), ``template`` and
    ``base_model``, plus ``steering.direction``: the mean state of teacher-forced refusals minus
    the mean state of the model's own compliant completions (train split), used by ``redirect``.

    Args:
        features_dir: Where to write the features directory (resumable; ``sap train --features``
            can train on it too); in memory when ``None``.
        prompt_records: Labelled prompts (with train/validation splits) whose *last prompt token*
            is added as rows. That state emits the first generated token, so it is where a
            refusal is decided; response-token rows alone never cover it (a gate trained only on
            them fires at random there). Train rows are repeated ``prompt_repeat`` times to
            balance them against the many token rows.
    """
    from sapguard.features.extract import extract_features, extract_to_dir
    from sapguard.models.chat import resolve_template
    from sapguard.polytope.train import TrainConfig, train_polytope

    template = resolve_template(lm.tokenizer, template)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "validation"]
    if not train or not val:
        raise SapError("the steering set needs train and validation records")
    if features_dir is not None:
        fs = extract_to_dir(
            lm,
            list(records),
            features_dir,
            layer,
            policy="response_tokens",
            template=template,
            show_progress=show_progress,
        )
        x_tr, y_tr, rec_tr = fs.subset("train")
        x_va, y_va, _ = fs.subset("validation")
    else:
        x_tr, idx_tr, _ = extract_features(
            lm, train, layer, policy="response_tokens", template=template, show_progress=show_progress
        )
        x_va, idx_va, _ = extract_features(
            lm, val, layer, policy="response_tokens", template=template, show_progress=show_progress
        )
        rec_tr = [train[i] for i in idx_tr.tolist()]
        y_tr = np.array([0 if train[i].is_safe else 1 for i in idx_tr.tolist()])
        y_va = np.array([0 if val[i].is_safe else 1 for i in idx_va.tolist()])
    if prompt_records:
        parts = []
        for split in ("train", "validation"):
            recs = [r for r in prompt_records if r.split == split]
            if not recs:
                raise SapError(f"prompt_records have no {split} split")
            xp, _, _ = extract_features(
                lm, recs, layer, policy="last_prompt", template=template, show_progress=show_progress
            )
            yp = np.array([0 if r.is_safe else 1 for r in recs])
            parts.append((xp, yp, recs))
        (xp_tr, yp_tr, rp_tr), (xp_va, yp_va, _) = parts
        x_tr = torch.cat([x_tr, xp_tr.repeat(prompt_repeat, 1)])
        y_tr = np.concatenate([y_tr, np.tile(yp_tr, prompt_repeat)])
        rec_tr = list(rec_tr) + list(rp_tr) * prompt_repeat
        x_va, y_va = torch.cat([x_va, xp_va]), np.concatenate([y_va, yp_va])
    meta = {
        "layer": layer,
        "policy": "response_tokens+last_prompt" if prompt_records else "response_tokens",
        "template": template,
        "base_model": lm.identity(),
        "training_data": "sapguard steering set (own completions vs teacher-forced refusals + benign answers)",
    }
    result = train_polytope(
        x_tr,
        y_tr,
        x_va,
        y_va,
        train_config or TrainConfig(),
        train_records=rec_tr,
        meta=meta,
        show_progress=show_progress,
    )
    refusal_rows = torch.tensor([r.source == "steer/refusal" for r in rec_tr])
    comply_rows = torch.tensor([r.source == "steer/own-completion" and not r.is_safe for r in rec_tr])
    direction = mean_direction(x_tr, refusal_rows, comply_rows)
    result.polytope.meta["steering"] = {
        "direction": [round(float(v), 5) for v in direction],
        "direction_source": "refusal minus compliance, train split",
    }
    return result.polytope
