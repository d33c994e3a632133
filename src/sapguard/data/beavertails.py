"""BeaverTails (PKU-Alignment) question-answer pairs labelled safe/unsafe with 14 harm categories.

Loads a local copy (a file or a directory in the Hugging Face layout: JSON lines, JSON arrays or
parquet files named after the split) or, when no path is given, ``datasets.load_dataset(
"PKU-Alignment/BeaverTails", split=...)``. Licence: CC BY-NC 4.0 (non-commercial).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sapguard.data.records import Record, prompt_and_response
from sapguard.data.splits import normalize_text
from sapguard.errors import SapError

log = logging.getLogger(__name__)

BEAVERTAILS_SPLITS = ("330k_train", "330k_test", "30k_train", "30k_test")
BEAVERTAILS_CATEGORIES = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)
SOURCE = "PKU-Alignment/BeaverTails"
_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def _row_to_record(row: dict[str, Any], where: str) -> Record:
    prompt, response = prompt_and_response(row, where)
    is_safe = row.get("is_safe")
    if not isinstance(is_safe, bool):
        if is_safe in (0, 1):
            is_safe = bool(is_safe)
        else:
            raise SapError(f"{where}: 'is_safe' must be true or false, got {is_safe!r}")
    category = row.get("category") or {}
    if not isinstance(category, dict):
        raise SapError(f"{where}: 'category' must be an object of category name -> bool")
    cats = tuple(sorted(str(k) for k, v in category.items() if v))
    return Record(
        prompt=prompt,
        response=response,
        is_safe=is_safe,
        categories=cats,
        source=SOURCE,
        # BeaverTails pairs one prompt with several responses: all of them stay in one split
        group="bt-" + hashlib.sha256(normalize_text(prompt).encode("utf-8")).hexdigest()[:12],
    )


def _open_text(path: Path) -> list[str]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SapError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None


def _rows_from_file(path: Path) -> Iterable[tuple[dict[str, Any], str]]:
    if path.name.endswith(".parquet"):
        try:
            import pandas as pd
        except ImportError:
            raise SapError(f"{path}: reading parquet needs pandas and pyarrow") from None
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow missing or a broken file
            raise SapError(f"{path}: cannot read parquet ({err})") from None
        for i, row in enumerate(frame.to_dict(orient="records"), start=1):
            yield row, f"{path}:row {i}"
        return
    lines = _open_text(path)
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("["):
        try:
            data = json.loads("\n".join(lines))
        except json.JSONDecodeError as err:
            raise SapError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise SapError(f"{path}: item {i} is not a JSON object")
            yield row, f"{path}:item {i}"
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SapError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SapError(f"{path}:{number}: expected a JSON object")
        yield row, f"{path}:{number}"


def _files_for_split(root: Path, split: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
    chosen = [p for p in files if p.name.startswith(split) or p.parent.name == split]
    if not chosen:
        names = ", ".join(p.relative_to(root).as_posix() for p in files[:10]) or "no data files"
        raise SapError(f"{root}: no file for split {split!r} (found: {names})")
    return chosen


def load_beavertails(split: str = "30k_train", *, path: str | Path | None = None) -> list[Record]:
    """BeaverTails rows as records (response kept; categories = the names marked true).

    Args:
        split: One of ``330k_train``, ``330k_test``, ``30k_train``, ``30k_test``.
        path: A local file, or a directory holding files named ``<split>.jsonl[.gz]``/``.json``/
            ``.parquet`` (or inside a ``<split>/`` folder). Without it, the Hugging Face Hub is tried.

    Raises:
        SapError: unknown split, a malformed local copy (naming file and line), or no local copy and
            the Hub unreachable.
    """
    if split not in BEAVERTAILS_SPLITS:
        raise SapError(f"unknown BeaverTails split {split!r}; expected one of {', '.join(BEAVERTAILS_SPLITS)}")
    if path is not None:
        root = Path(path).expanduser()
        if not root.exists():
            raise SapError(f"{root}: BeaverTails copy not found")
        files = [root] if root.is_file() else _files_for_split(root, split)
        records = [_row_to_record(row, where) for f in files for row, where in _rows_from_file(f)]
        if not records:
            raise SapError(f"{root}: no BeaverTails rows for split {split!r}")
        return records
    try:
        from datasets import load_dataset

        dataset = load_dataset(SOURCE, split=split)
    except Exception as err:  # network, auth, missing package: all mean "not reachable"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SapError(
            f"cannot load {SOURCE} split {split!r} from the Hugging Face Hub ({first}); "
            "download it elsewhere and pass path=<file or directory>"
        ) from None
    return [_row_to_record(dict(row), f"{SOURCE}[{split}] row {i}") for i, row in enumerate(dataset, start=1)]
