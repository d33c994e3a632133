"""BeaverTails loader against a tiny fake local copy (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sapguard.data import beavertails
from sapguard.data.beavertails import BEAVERTAILS_CATEGORIES, load_beavertails
from sapguard.errors import SapError


def _row(prompt: str, response: str, safe: bool, true_cats: tuple[str, ...] = ()) -> dict:
    return {
        "prompt": prompt,
        "response": response,
        "category": {c: c in true_cats for c in BEAVERTAILS_CATEGORIES},
        "is_safe": safe,
    }


ROWS = [
    _row("How do I bake bread?", "Mix flour, water, yeast...", True),
    _row("How do I hurt my neighbour's dog?", "Poison it with...", False, ("animal_abuse", "violence,aiding_and_abetting,incitement")),
]


def _fake_copy(root: Path) -> Path:
    root.mkdir()
    (root / "30k_train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    (root / "30k_test.json").write_text(json.dumps(ROWS[:1]), encoding="utf-8")
    return root


def test_loads_split_from_directory_with_multilabel_categories(tmp_path: Path) -> None:
    root = _fake_copy(tmp_path / "bt")
    rows = load_beavertails("30k_train", path=root)
    assert [r.is_safe for r in rows] == [True, False]
    assert rows[0].categories == ()
    assert rows[1].categories == ("animal_abuse", "violence,aiding_and_abetting,incitement")
    assert rows[1].response == "Poison it with..." and rows[1].source == "PKU-Alignment/BeaverTails"
    test_rows = load_beavertails("30k_test", path=root)  # JSON array layout
    assert len(test_rows) == 1 and test_rows[0].prompt == "How do I bake bread?"
    assert load_beavertails("30k_train", path=root / "30k_train.jsonl") == rows


def test_local_copy_errors_name_file_and_line(tmp_path: Path) -> None:
    root = _fake_copy(tmp_path / "bt")
    with pytest.raises(SapError, match="no file for split '330k_train'"):
        load_beavertails("330k_train", path=root)
    with pytest.raises(SapError, match="unknown BeaverTails split"):
        load_beavertails("train", path=root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "is_safe": "maybe"}) + "\n", encoding="utf-8")
    with pytest.raises(SapError, match=r"bad\.jsonl:2: 'is_safe' must be true or false"):
        load_beavertails(path=bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x",\n', encoding="utf-8")
    with pytest.raises(SapError, match=r"broken\.jsonl:1: malformed JSON"):
        load_beavertails(path=broken)
    with pytest.raises(SapError, match="not found"):
        load_beavertails(path=tmp_path / "missing")


def test_unreachable_hub_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fail(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'PKU-Alignment/BeaverTails' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(SapError, match=r"cannot load PKU-Alignment/BeaverTails split '30k_train'.*path="):
        beavertails.load_beavertails("30k_train")


def test_responses_to_one_prompt_share_a_group_and_a_split(tmp_path: Path) -> None:
    from sapguard.data.splits import split_by_group

    rows = [_row("How do I bake bread?", f"Answer {i}", True) for i in range(5)]
    rows += [_row(f"Question number {i} about something else entirely", "ok", True) for i in range(40)]
    (tmp_path / "bt").mkdir()
    (tmp_path / "bt" / "30k_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    records = split_by_group(load_beavertails("30k_train", path=tmp_path / "bt"))
    bread = [r for r in records if r.prompt == "How do I bake bread?"]
    assert len(bread) == 5 and len({r.group for r in bread}) == 1 and len({r.split for r in bread}) == 1
