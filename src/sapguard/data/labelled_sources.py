"""Public prompt collections whose rows carry no request label, labelled by reading.

PyRIT ships prompts that are not a labelled prompt set: the *objectives* of its scorer-evaluation
tables (AI Red Team prompts, many framed as fiction, research or a personal story, with a human score
for a *response*, not for the request) and the user turns of its many-shot jailbreak examples (their
``category`` judges the assistant's answer). Their requests were labelled one by one by reading, with
the rule in docs/DATA.md ("Labelled by reading"); the labels live in
``prompts/labels_pyrit_objectives.jsonl`` keyed by the first 12 hex digits of the SHA-256 of the
stripped text, with a short reason each. A row without a label is an error (the pinned wheel and the
labels file must agree); ``drop`` rows (not a request, or undecidable) are left out.

They are not in the default corpus: ``benchmarks/external_detection.py`` scores the shipped detector on
them as collections it never saw.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

from sapguard.data.extra_sources import _json, clean, decode_member
from sapguard.data.records import Record
from sapguard.errors import SapError

Reader = Callable[[str], bytes]

LABELS_FILE = Path(__file__).parent / "prompts" / "labels_pyrit_objectives.jsonl"
LABELS = ("unsafe", "safe", "drop")

_SCORER = "pyrit/datasets/scorer_evals/"
SCORER_OBJECTIVES = tuple(
    _SCORER + name
    for name in (
        "harm/exploits.csv",
        "harm/hate_speech.csv",
        "harm/hate_speech_multi_score.csv",
        "harm/info_integrity.csv",
        "harm/mini_hate_speech.csv",
        "harm/privacy.csv",
        "harm/representational.csv",
        "harm/self_harm.csv",
        "harm/sexual.csv",
        "harm/violence.csv",
        "harm/violence_multi_score.csv",
        "objective/bias.csv",
        "objective/chemical_biological.csv",
        "objective/cyber.csv",
        "objective/exploits.csv",
        "objective/harassment_bullying.csv",
        "objective/hate_speech.csv",
        "objective/illegal_activity.csv",
        "objective/info_integrity.csv",
        "objective/misinformation.csv",
        "objective/phishing.csv",
        "objective/privacy.csv",
        "objective/self_harm.csv",
        "objective/sexual.csv",
        "objective/violence.csv",
        "refusal_scorer/refusal.csv",
        "refusal_scorer/refusal_extra.csv",
        "sample/mini_refusal.csv",
    )
)
MANY_SHOT = "pyrit/datasets/jailbreak/many_shot_examples.json"


def text_id(text: str) -> str:
    """The label key of a text: first 12 hex digits of the SHA-256 of the stripped text."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:12]


def read_labels(path: Path = LABELS_FILE) -> dict[str, str]:
    """``{text id: label}`` from the labels file; a malformed line is a one-line error naming it."""
    labels: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SapError(f"{path}: cannot read the labels ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, label = str(row["id"]), str(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SapError(f"{path}:{number}: expected a JSON object with 'id' and 'label' ({err})") from None
        if label not in LABELS:
            raise SapError(f"{path}:{number}: label must be one of {LABELS}, got {label!r}")
        labels[key] = label
    if not labels:
        raise SapError(f"{path}: no labels")
    return labels


def scorer_objectives(data: bytes, where: str) -> list[str]:
    """The distinct ``objective`` cells of one scorer-evaluation CSV (leading ``#`` lines are metadata)."""
    lines = decode_member(data, where).splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    reader = csv.DictReader(io.StringIO("".join(lines)))
    if "objective" not in (reader.fieldnames or []):
        raise SapError(f"{where}: no 'objective' column (got {reader.fieldnames})")
    return list(dict.fromkeys(t for t in ((row.get("objective") or "").strip() for row in reader) if t))


def many_shot_requests(data: bytes, where: str) -> list[str]:
    """The distinct user turns of PyRIT's many-shot jailbreak examples."""
    doc = _json(data, where)
    if not isinstance(doc, list) or not all(isinstance(x, dict) and "user" in x for x in doc):
        raise SapError(f"{where}: expected a JSON list of objects with a 'user' field")
    return list(dict.fromkeys(t for t in (str(x["user"]).strip() for x in doc) if t))


def _labelled(texts: list[str], source: str, where: str, labels: dict[str, str]) -> list[Record]:
    out = []
    for text in texts:
        label = labels.get(text_id(text))
        if label is None:
            raise SapError(
                f"{LABELS_FILE.name}: no label for {where} row {text_id(text)} ({text[:60]!r}); label it by reading"
            )
        if label != "drop":
            out.append(Record(prompt=clean(text), is_safe=label == "safe", source=source))
    return out


def read_scorer_objectives(read: Reader, labels: dict[str, str] | None = None) -> list[Record]:
    """PyRIT scorer-evaluation objectives, labelled by reading (both labels)."""
    labels = read_labels() if labels is None else labels
    texts: list[str] = []
    for member in SCORER_OBJECTIVES:
        texts += scorer_objectives(read(member), member)
    return _labelled(list(dict.fromkeys(texts)), "pyrit/scorer_objectives", "scorer_evals", labels)


def read_many_shot(read: Reader, labels: dict[str, str] | None = None) -> list[Record]:
    """The user turns of PyRIT's many-shot jailbreak examples, labelled by reading."""
    labels = read_labels() if labels is None else labels
    return _labelled(many_shot_requests(read(MANY_SHOT), MANY_SHOT), "pyrit/many_shot", "many_shot", labels)


READERS: tuple[Callable[[Reader], list[Record]], ...] = (read_scorer_objectives, read_many_shot)
