"""Multiple-choice accuracy in the MMLU format.

Sources: a directory in the ``cais/mmlu`` layout (``*/test-*.parquet`` or ``*.parquet`` with
``question``, ``choices``, ``answer`` columns), Hendrycks-style header-less CSVs
(``question,A,B,C,D,answer-letter``), JSONL with ``question``, ``choices``, ``answer`` (index or
letter), or the small original set shipped with sapguard (:func:`local_questions`, 42 questions
written for this project in the MMLU format; a smoke test of utility, not MMLU itself).

Scoring: zero-shot, chat template, the answer letter with the highest next-token logit among
``A``-``D`` at the position that emits the first answer token (the steering hook's generated
token 0, so steering applies exactly as in generation).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sapguard.errors import SapError

LETTERS = "ABCD"


@dataclass(frozen=True)
class MCQuestion:
    """One four-way multiple-choice question; ``answer`` is the index of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""

    def prompt(self) -> str:
        body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{body}\nAnswer with the letter of the correct choice."


def _question(row: dict[str, Any], where: str) -> MCQuestion:
    try:
        choices = tuple(str(c) for c in row["choices"])
        answer = row["answer"]
        answer = LETTERS.index(answer.strip().upper()) if isinstance(answer, str) else int(answer)
        if len(choices) != 4 or not 0 <= answer < 4:
            raise ValueError
        return MCQuestion(str(row["question"]), choices, answer, str(row.get("subject", "")))
    except (KeyError, ValueError, TypeError):
        raise SapError(f"{where}: expected question, four choices and an answer (0-3 or A-D)") from None


def local_questions() -> list[MCQuestion]:
    """The shipped MMLU-format set (42 questions)."""
    text = resources.files("sapguard.bench").joinpath("mmlu_local.jsonl").read_text(encoding="utf-8")
    return [
        _question(json.loads(line), f"mmlu_local.jsonl:{i + 1}")
        for i, line in enumerate(text.splitlines())
        if line.strip()
    ]


def load_questions(path: str | Path, limit: int | None = None) -> list[MCQuestion]:
    """Questions from a ``cais/mmlu`` directory, a CSV or JSONL file, or a directory of CSVs."""
    path = Path(path)
    if not path.exists():
        raise SapError(f"{path}: no such file or directory")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    out: list[MCQuestion] = []
    for f in files:
        if f.suffix == ".jsonl":
            out += [
                _question(json.loads(line), f"{f}:{i + 1}")
                for i, line in enumerate(f.read_text().splitlines())
                if line.strip()
            ]
        elif f.suffix == ".csv":
            with f.open(newline="", encoding="utf-8") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    if len(row) != 6:
                        raise SapError(f"{f}:{i + 1}: expected question,A,B,C,D,answer")
                    out.append(
                        _question(
                            {"question": row[0], "choices": row[1:5], "answer": row[5], "subject": f.stem},
                            f"{f}:{i + 1}",
                        )
                    )
        elif f.suffix == ".parquet" and (not path.is_dir() or "test" in f.name):
            import pandas as pd

            for i, row in enumerate(pd.read_parquet(f).to_dict("records")):
                row["choices"] = list(row["choices"])
                out.append(_question(row, f"{f}:{i + 1}"))
    if not out:
        raise SapError(f"{path}: no MMLU-format questions found")
    return out[:limit] if limit else out


@torch.no_grad()
def mc_accuracy(
    lm: Any,
    questions: Sequence[MCQuestion],
    *,
    template: str = "auto",
    system: str | None = None,
    context: Callable[[], Any] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Accuracy over ``questions``; ``context`` (e.g. a steering hook factory) wraps each forward.

    Returns:
        ``{"accuracy": ..., "n": ...}``.
    """
    import contextlib

    from sapguard.features.hooks import left_pad
    from sapguard.models.chat import encode_prompt, resolve_template

    template = resolve_template(lm.tokenizer, template)
    letter_ids = [lm.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in LETTERS]
    correct = 0
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        ids = [encode_prompt(lm.tokenizer, q.prompt(), template, system) for q in batch]
        inputs = left_pad(ids, lm.tokenizer.pad_token_id, lm.device)
        with context() if context else contextlib.nullcontext():
            logits = lm.model(**inputs, use_cache=False).logits[:, -1, letter_ids]
        correct += int((logits.argmax(-1).cpu() == torch.tensor([q.answer for q in batch])).sum())
    return {"accuracy": correct / len(questions), "n": float(len(questions))}
