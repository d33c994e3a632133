"""The shipped detector on prompt collections the default corpus never drew on (labelled by reading).

PyRIT's scorer-evaluation objectives (AI Red Team prompts, many framed as fiction, research or a
personal story, plus everyday and copyright requests) and the user turns of its many-shot jailbreak
examples, labelled one by one by reading (``sapguard.data.labelled_sources``). Rows whose text is in the
default corpus are left out; rows with a near-duplicate there (content-word Jaccard >= 0.5, the corpus's
own grouping rule) are reported apart, so the headline is on requests the detector never saw in any form.
Verdicts are what ``sap detect`` returns (the shipped 5 %-FPR threshold, calibrated on the corpus's
validation benign rows); recall and flagged rates carry 95 % Wilson intervals.

    python benchmarks/external_detection.py [--out benchmarks/results_external_detection.json]
    python benchmarks/external_detection.py --polytope src/sapguard/assets/steering --out benchmarks/results_external_gate.json
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from train_default_detector import wilson

from sapguard.bench.run import provenance
from sapguard.data import labelled_sources
from sapguard.data.default_corpus import build_default_corpus
from sapguard.data.records import Record
from sapguard.data.splits import content_tokens, near_duplicate_components, normalize_text
from sapguard.data.wheels import PYRIT_WHEEL, fetch_wheel
from sapguard.detect import scan
from sapguard.io import write_json
from sapguard.polytope.artifact import default_polytope
from sapguard.polytope.model import SafetyPolytope, polytope_config

HERE = Path(__file__).resolve().parent


def external_rows() -> tuple[list[Record], list[bool]]:
    """The labelled rows not in the corpus, and whether each has a near-duplicate in the corpus."""
    corpus = [r for r in build_default_corpus() if r.wrapper is None and not r.history]
    with zipfile.ZipFile(fetch_wheel(PYRIT_WHEEL)) as zf:
        rows = [row for reader in labelled_sources.READERS for row in reader(zf.read)]
    seen = {normalize_text(r.prompt) for r in corpus}
    fresh: dict[str, Record] = {}
    for r in rows:
        fresh.setdefault(normalize_text(r.prompt), r) if normalize_text(r.prompt) not in seen else None
    out = list(fresh.values())
    anchors = near_duplicate_components([content_tokens(r.prompt) for r in [*corpus, *out]])
    return out, [a < len(corpus) for a in anchors[len(corpus) :]]


def auroc(scores: np.ndarray, unsafe: np.ndarray) -> float | None:
    """Probability that an unsafe row outscores a safe one (ties count half)."""
    pos, neg = scores[unsafe], scores[~unsafe]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def summary(rows: Sequence[Record], flagged: np.ndarray, scores: np.ndarray) -> dict[str, object]:
    unsafe = np.array([not r.is_safe for r in rows], dtype=bool)
    k_pos, n_pos = int(flagged[unsafe].sum()), int(unsafe.sum())
    k_neg, n_neg = int(flagged[~unsafe].sum()), int((~unsafe).sum())
    return {
        "unsafe": n_pos,
        "safe": n_neg,
        "recall": k_pos / n_pos if n_pos else None,
        "recall_ci95": wilson(k_pos, n_pos) if n_pos else None,
        "safe_flagged": k_neg / n_neg if n_neg else None,
        "safe_flagged_ci95": wilson(k_neg, n_neg) if n_neg else None,
        "auroc": auroc(scores, unsafe),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results_external_detection.json")
    parser.add_argument("--polytope", type=Path, help="another polytope directory (e.g. the steering gate); default: the shipped detector")
    args = parser.parse_args()
    rows, near = external_rows()
    poly = SafetyPolytope.from_pretrained(args.polytope) if args.polytope else default_polytope()
    config = polytope_config(poly)
    start = time.perf_counter()
    verdicts = scan(poly, [r.prompt for r in rows], show_progress=True)
    seconds = time.perf_counter() - start
    flagged = np.array([not v.is_safe for v in verdicts])
    scores = np.array([v.score for v in verdicts])
    near_a = np.array(near)
    groups: dict[str, dict[str, object]] = {}
    for name, mask in (
        ("all not in corpus", np.ones(len(rows), bool)),
        ("no near-duplicate in corpus", ~near_a),
        ("near-duplicate of a corpus row", near_a),
    ):
        idx = np.flatnonzero(mask)
        groups[name] = summary([rows[i] for i in idx], flagged[idx], scores[idx])
        for source in sorted({r.source for r in rows}):
            sub = np.array([i for i in idx if rows[i].source == source], dtype=int)
            if not len(sub):
                continue
            groups[f"{name} / {source}"] = summary([rows[i] for i in sub], flagged[sub], scores[sub])
    misses = [
        {"text": rows[i].prompt[:200], "score": round(float(scores[i]), 3)}
        for i in np.flatnonzero(~flagged & ~near_a & np.array([not r.is_safe for r in rows]))
    ]
    false_alarms = [
        {"text": rows[i].prompt[:200], "score": round(float(scores[i]), 3)}
        for i in np.flatnonzero(flagged & np.array([r.is_safe for r in rows]))
    ]
    result = {
        "provenance": provenance(["python", *sys.argv]),
        "detector": {k: config.get(k) for k in ("views", "layer", "policy", "weights_sha256", "calibration")},
        "labels": str(labelled_sources.LABELS_FILE.name),
        "scan_seconds": round(seconds, 1),
        "groups": groups,
        "missed_unsafe_sample": misses[:40],
        "false_alarms": false_alarms,
    }
    write_json(args.out, result)
    for name, g in groups.items():
        print(f"{name:60s} {g}")


if __name__ == "__main__":
    main()
