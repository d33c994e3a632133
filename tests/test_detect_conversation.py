"""Conversations as detection input: scan() and `sap detect` read chat messages as training reads history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sapguard.cli import app
from sapguard.data.records import Record
from sapguard.detect import Conversation, conversation_from_messages, fit_conversation, scan
from sapguard.errors import SapError
from sapguard.features.extract import extract_features
from sapguard.models.chat import encode_pair, encode_prompt
from sapguard.polytope.artifact import load_polytope, save_polytope
from sapguard.polytope.model import EncoderSpec, SafetyPolytope, read_in_batches
from tests.conftest import make_tiny

HISTORY = (("what is medicine", "medicine is the help of a doctor"), ("tell me about history", "history is a story of war"))
PROMPT = "how do i make a bomb"


def chat(history=HISTORY, prompt: str = PROMPT, reply: str | None = None) -> list[dict[str, str]]:
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": prompt})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def random_polytope(lm, policy: str = "last_prompt", max_length: int = 512) -> SafetyPolytope:
    torch.manual_seed(1)
    return SafetyPolytope(
        32, 3, EncoderSpec(kind="mlp", width=16),
        meta={"layer": 2, "policy": policy, "template": "chat", "max_length": max_length, "base_model": {"id": lm.model_id}},
    ).eval()


def reference(poly: SafetyPolytope, lm, record: Record) -> list[float]:
    """The margins of ``record`` read as training reads it (extract_features), no scan() involved."""
    feats, _, _ = extract_features(lm, [record], 2, policy=poly.meta["policy"], template="chat")
    return read_in_batches(poly, feats).max(dim=0).values.tolist()


@pytest.mark.parametrize("policy", ["last_prompt", "mean_prompt"])
def test_a_conversation_scans_to_the_margins_of_a_record_with_that_history(policy: str) -> None:
    lm = make_tiny("llama")
    poly = random_polytope(lm, policy)
    short = chat(history=HISTORY[:1], prompt="bake bread")
    verdicts = scan(poly, ["how do i bake bread", chat(), short], lm=lm)  # mixed with a text, in one batch
    got = [list(v.margins.values()) for v in verdicts]
    assert got[1] == pytest.approx(reference(poly, lm, Record(PROMPT, history=HISTORY)), abs=1e-5)
    assert got[2] == pytest.approx(reference(poly, lm, Record("bake bread", history=HISTORY[:1])), abs=1e-5)
    assert got[0] == pytest.approx(reference(poly, lm, Record("how do i bake bread")), abs=1e-5)
    assert [(v.text, v.earlier_turns, v.dropped_turns, v.windows) for v in verdicts] == [
        ("how do i bake bread", 0, 0, 1), (PROMPT, 2, 0, 1), ("bake bread", 1, 0, 1)
    ]
    # the history changes what is read: not the margins of the last message alone
    assert got[1] != pytest.approx(reference(poly, lm, Record(PROMPT)), abs=1e-5)
    # one bare conversation is one item, as one bare string is
    (bare,) = scan(poly, chat(), lm=lm)
    assert list(bare.margins.values()) == pytest.approx(got[1], abs=1e-5)


def test_messages_become_history_prompt_and_reply() -> None:
    messages = [{"role": "system", "content": "be nice"}, *chat(reply="no")]
    assert conversation_from_messages(messages) == Conversation(PROMPT, HISTORY, "no")
    assert conversation_from_messages(chat(history=())) == Conversation(PROMPT)
    # consecutive messages of one role are one turn; content as text parts
    joined = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "there"}]},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert conversation_from_messages(joined) == Conversation("bye", (("hi\n\nthere", "hello"),))


def test_a_conversation_ending_with_a_reply_reads_it_as_the_prompts_response() -> None:
    lm = make_tiny("llama")
    poly = random_polytope(lm, "response_tokens")
    (v,) = scan(poly, [chat(reply="sell drug to a friend")], lm=lm)
    want = reference(poly, lm, Record(PROMPT, response="sell drug to a friend", history=HISTORY))
    assert list(v.margins.values()) == pytest.approx(want, abs=1e-5)
    assert (v.text, v.earlier_turns) == (PROMPT, 2)
    with pytest.raises(SapError, match=r"item 1: the conversation ends with an assistant reply and responses\[0\]"):
        scan(poly, [chat(reply="x")], lm=lm, responses=["y"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([{"role": "bot", "content": "hi"}], r"^item 2: message 1: unknown 'role' 'bot'; expected one of system, user, assistant$"),
        ([{"role": "user", "content": "  "}], r"^item 2: message 1: 'content' must be a non-empty string"),
        ([{"role": "user"}], r"^item 2: message 1: 'content' must be"),
        ([{"role": "user", "content": "hi"}, "hello"], r"^item 2: message 2: expected an object with 'role' and 'content', got str$"),
        ([{"role": "system", "content": "be nice"}], r"^item 2: no user message"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], r"^item 2: message 1: 'role' assistant before the first user"),
        ([], r"^item 2: 'messages' is empty$"),
        ({"role": "user", "content": "hi"}, r"^item 2: a conversation must be a list of messages"),
        (42, r"^item 2: a conversation must be a list of messages .* got int$"),
        ("   ", r"^text 2: empty or whitespace-only text$"),
    ],
)
def test_bad_messages_are_one_line_errors_naming_item_and_field(item, message: str) -> None:
    with pytest.raises(SapError, match=message) as err:
        scan(random_polytope(make_tiny("llama")), ["bake bread", item], lm=None)  # refused before loading a model
    assert "\n" not in str(err.value)


def test_a_conversation_over_max_chars_is_refused() -> None:
    lm = make_tiny("llama")
    with pytest.raises(SapError, match=r"^item 1: 30 characters in the conversation exceeds the limit of 25"):
        scan(random_polytope(lm), [chat(history=(("a" * 10, "b" * 10),), prompt="c" * 10)], lm=lm, max_chars=25)


LONG_HISTORY = tuple((f"tell me about history {i} of war", "history is a story of war and medicine") for i in range(6))


def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_last_whole() -> None:
    lm = make_tiny("llama")
    poly = random_polytope(lm, max_length=40)
    tok = lm.tokenizer
    (v,) = scan(poly, [chat(history=LONG_HISTORY)], lm=lm)
    assert v.dropped_turns > 0 and v.earlier_turns > 0 and v.earlier_turns + v.dropped_turns == len(LONG_HISTORY)
    assert v.text == PROMPT and v.windows == 1
    kept = LONG_HISTORY[v.dropped_turns:]  # the newest turns are the ones kept
    assert list(v.margins.values()) == pytest.approx(reference(poly, lm, Record(PROMPT, history=kept)), abs=1e-5)
    # the fewest dropped: the kept turns fit in the window of 40 tokens, one more would not
    overhead = len(encode_prompt(tok, PROMPT, "chat")) - len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert len(encode_prompt(tok, PROMPT, "chat", history=kept)) - overhead <= 40
    assert len(encode_prompt(tok, PROMPT, "chat", history=LONG_HISTORY[v.dropped_turns - 1:])) - overhead > 40
    # a wider window reads it all
    (whole,) = scan(poly, [chat(history=LONG_HISTORY)], lm=lm, window=1000)
    assert (whole.earlier_turns, whole.dropped_turns) == (len(LONG_HISTORY), 0)


def test_a_last_turn_longer_than_the_window_is_read_in_windows_without_history() -> None:
    lm = make_tiny("llama")
    poly = random_polytope(lm, max_length=16)
    long_prompt = " ".join(["how do i bake bread and cake"] * 6)  # 42 tokens
    (v,) = scan(poly, [chat(prompt=long_prompt)], lm=lm)
    (alone,) = scan(poly, [long_prompt], lm=lm)
    assert (v.windows, v.earlier_turns, v.dropped_turns) == (alone.windows, 0, len(HISTORY))
    assert v.windows > 1 and v.margins == pytest.approx(alone.margins, abs=1e-5)


def test_fit_conversation_with_a_reply_counts_the_reply() -> None:
    lm = make_tiny("llama")
    conv = Conversation(PROMPT, LONG_HISTORY, "sell drug to a friend and buy a weapon knife to kill the friend")
    fitted, dropped = fit_conversation(lm, conv, "chat", 40)
    _, plain_dropped = fit_conversation(lm, Conversation(PROMPT, LONG_HISTORY), "chat", 40)
    assert dropped > plain_dropped and fitted.history == LONG_HISTORY[dropped:] and fitted.response == conv.response
    tok = lm.tokenizer
    overhead = len(encode_prompt(tok, PROMPT, "chat")) - len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert len(encode_pair(tok, PROMPT, conv.response, "chat", fitted.history)[0]) - overhead <= 40
    assert fit_conversation(lm, Conversation(PROMPT), "chat", 8) == (Conversation(PROMPT), 0)


# -- sap detect with JSONL conversations ----------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conv")
    lm = make_tiny("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    lm.model_id = str((root / "model").resolve())
    save_polytope(random_polytope(lm, max_length=40), root / "poly")
    return root


def test_cli_detect_reads_messages_rows_as_conversations(artifact: Path) -> None:
    rows = [{"messages": chat()}, {"prompt": "bake bread"}, {"text": "steal card"}, {"messages": chat(history=LONG_HISTORY)}]
    path = artifact / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["detect", "--polytope", str(artifact / "poly"), "--input", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [v["text"] for v in out] == [PROMPT, "bake bread", "steal card", PROMPT]
    assert [(v["earlier_turns"], v["dropped_turns"]) for v in out[:3]] == [(2, 0), (0, 0), (0, 0)]
    assert out[3]["dropped_turns"] > 0 and out[3]["earlier_turns"] + out[3]["dropped_turns"] == len(LONG_HISTORY)
    lm = make_tiny("llama")
    lm.model_id = str((artifact / "model").resolve())
    (direct,) = scan(load_polytope(artifact / "poly"), [chat()], lm=lm)
    assert list(out[0]["margins"].values()) == pytest.approx(list(direct.margins.values()), abs=1e-5)
    table = runner.invoke(app, ["detect", "--polytope", str(artifact / "poly"), "--input", str(path)])
    assert table.exit_code == 0 and "(+2 turns)" in table.stdout, table.output


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "bot", "content": "hi"}]}, "in.jsonl:2: message 1: unknown 'role' 'bot'"),
        ({"messages": "hi"}, "in.jsonl:2: a conversation must be a list of messages"),
        ({"messages": chat(), "prompt": "x"}, "in.jsonl:2: give 'messages' or a 'prompt', not both"),
        ({"response": "x"}, "in.jsonl:2: expected an object with a non-empty 'prompt', 'text' or 'messages'"),
    ],
)
def test_cli_detect_bad_messages_rows(artifact: Path, row, message: str) -> None:
    path = artifact / "in.jsonl"
    path.write_text(json.dumps({"prompt": "bake bread"}) + "\n" + json.dumps(row) + "\n")
    res = runner.invoke(app, ["detect", "--polytope", str(artifact / "poly"), "--input", str(path)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


def test_without_a_chat_template_a_conversation_is_read_as_paragraphs_as_in_training() -> None:
    lm = make_tiny("llama")
    lm.tokenizer.chat_template = None
    poly = random_polytope(lm)
    poly.meta["template"] = "auto"
    (v,) = scan(poly, [chat()], lm=lm)
    feats, _, _ = extract_features(lm, [Record(PROMPT, history=HISTORY)], 2, template="auto")
    assert list(v.margins.values()) == pytest.approx(read_in_batches(poly, feats)[0].tolist(), abs=1e-5)
    assert v.earlier_turns == 2
