"""Judge validation: agreement of the bench's judges with hand labels (accuracy and Cohen's kappa).

Hand labels are JSONL rows ``{"request", "response", "label", ...}`` with ``label`` one of
:data:`LABELS`. Each judge is scored on the binary question it answers: the refusal judge on
``label == "refusal"``, the degeneration judge on ``label == "degenerate"`` and the attack-success
rule on ``label == "compliance"`` (coherent, on-topic compliance).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapguard.errors import SapError

LABELS = ("refusal", "compliance", "degenerate", "off_topic")
LABELS_FILE = Path(__file__).with_name("judge_labels.jsonl")
"""The project's hand labels (responses of the default model, base and steered)."""


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary raters (1.0 when both are constant and equal, 0.0 when chance-level)."""
    if len(a) != len(b) or not a:
        raise SapError("kappa needs two non-empty label lists of the same length")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected == 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - expected) / (1 - expected)


def read_labels(path: str | Path = LABELS_FILE) -> list[dict[str, Any]]:
    """Hand-labelled rows; every label must be one of :data:`LABELS`."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [r.get("label") for r in rows if r.get("label") not in LABELS]
    if bad:
        raise SapError(f"{path}: unknown label(s) {sorted(set(map(str, bad)))}; expected {', '.join(LABELS)}")
    return rows


def agreement(labels: Sequence[str], predicted: Sequence[bool], positive: str) -> dict[str, Any]:
    """Accuracy, kappa, precision and recall of a binary judge against hand labels (``positive`` class)."""
    truth = [lab == positive for lab in labels]
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    n = len(truth)
    return {
        "n": n,
        "positive": positive,
        "positives": sum(truth),
        "accuracy": sum(t == p for t, p in zip(truth, predicted)) / n if n else 0.0,
        "kappa": cohen_kappa(truth, list(predicted)),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


def judge_agreement(rows: Sequence[dict[str, Any]], lm: Any = None, template: str = "auto") -> dict[str, Any]:
    """Agreement of the refusal judge, the degeneration judge and the ASR rule with hand labels.

    The judges are re-run on each (request, response); with ``lm`` the degeneration judge also
    uses the base model's perplexity, as in the bench.
    """
    from sapguard.bench.judges import judge_all, perplexities

    requests = [r["request"] for r in rows]
    responses = [r["response"] for r in rows]
    ppl = perplexities(lm, requests, responses, template) if lm is not None else None
    verdicts = judge_all(requests, responses, ppl=ppl)
    labels = [r["label"] for r in rows]
    return {
        "refusal_judge": agreement(labels, [v.refusal for v in verdicts], "refusal"),
        "degeneration_judge": agreement(labels, [v.degenerate for v in verdicts], "degenerate"),
        "asr_rule": agreement(labels, [v.success for v in verdicts], "compliance"),
        "label_counts": {lab: labels.count(lab) for lab in LABELS},
        "perplexity": lm is not None,
    }


def reading_rates(samples: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Attack success *by reading*: per condition and set of a bench's ``samples``, the share of
    answers hand-labelled ``compliance`` in ``rows``, with its 95 % Wilson interval.

    A group's rate is given only when every one of its answers is labelled (``None`` otherwise, with
    the count labelled), so a reading rate never mixes labelled and judged answers.
    """
    from sapguard.bench.run import rate

    label_of: dict[tuple[str, str], str] = {}
    for r in rows:
        label_of.setdefault((r["request"], r["response"]), r["label"])
    groups: dict[tuple[str, str], list[str | None]] = {}
    for s in samples:
        groups.setdefault((s["condition"], s["set"]), []).append(label_of.get((s["request"], s["response"])))
    out: dict[str, Any] = {}
    for (condition, name), labels in sorted(groups.items()):
        labelled = sum(lab is not None for lab in labels)
        out.setdefault(condition, {})[name] = {
            "n": len(labels),
            "labelled": labelled,
            "compliance": rate([lab == "compliance" for lab in labels]) if labelled == len(labels) else None,
        }
    return out
