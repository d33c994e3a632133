"""Gate + behavioural target: training on a tiny model, the artifact round trip, scan on it."""

from __future__ import annotations

import torch

from sapguard.data.records import Record
from sapguard.detect import scan
from sapguard.steer import generate
from sapguard.steer.artifact import load_steering, save_steering, target_of
from sapguard.steer.modes import SafeFlow, make_mode
from sapguard.steer.target import SteeringTrainConfig, Trajectory, train_steering, trajectory_states

WORDS = [
    "bomb",
    "poison",
    "steal",
    "hack",
    "knife",
    "bread",
    "garden",
    "story",
    "music",
    "river",
    "cloud",
    "paper",
]


def _corpus() -> list[Record]:
    out = []
    for split, n in (("train", 24), ("validation", 9), ("test", 3)):
        for i in range(n):
            w = WORDS[i % 6]
            b = WORDS[6 + i % 6]
            out.append(
                Record(
                    f"how to {w} a thing {i}", is_safe=False, source="t", group=f"h{split}{i}", split=split
                )
            )
            out.append(
                Record(f"tell me about {b} {i}", is_safe=True, source="t", group=f"b{split}{i}", split=split)
            )
    return out


def test_trajectory_states_read_the_positions_steering_edits(tiny_llama):
    from sapguard.features.hooks import left_pad

    prompt, response = [3, 4, 5, 6], [7, 8, 9, 10, 11]
    t = Trajectory(prompt, response, True, "own", "train")
    x, owner = trajectory_states(
        tiny_llama, [t, Trajectory(prompt[:2], response, False, "own", "train", True)], 2, 3
    )
    assert sorted(owner) == [0, 0, 0, 1, 1]  # generated indices 0,1,2; the second skips index 0
    rows = [i for i, o in enumerate(owner) if o == 0]
    inputs = left_pad([prompt + response[:2]], tiny_llama.tokenizer.pad_token_id, tiny_llama.device)
    with torch.no_grad():
        hs = tiny_llama.model(**inputs, output_hidden_states=True).hidden_states[2][0]
    assert torch.allclose(x[rows], hs[3:6].float(), atol=1e-5)  # positions len(prompt)-1 .. +2


def test_train_save_load_and_steer_with_gate_and_target(tiny_llama, tmp_path, monkeypatch):
    from sapguard.data import attacks

    monkeypatch.setattr(attacks, "family_attacks", lambda family, n=24: list(attacks.HANDWRITTEN))
    cfg = SteeringTrainConfig(
        n_harmful=6, n_wrapped=3, n_benign=6, n_gate=12, n_gate_wrapped=6, first_n=3, max_new_tokens=4
    )
    gate = train_steering(tiny_llama, _corpus(), 2, cfg)
    target = target_of(gate)
    assert target is not None and gate.meta["policy"] == "last_prompt"
    assert gate.meta["steering"]["hook"]["gate"] == "prompt" and target.meta["role"] == "steering target"
    save_steering(gate, tmp_path / "art")
    assert (tmp_path / "art" / "target" / "model.safetensors").is_file()
    loaded = load_steering(tmp_path / "art")
    lt = target_of(loaded)
    assert lt is not None and torch.equal(lt.phi, target.phi)
    mode = make_mode("safeflow", loaded)
    assert isinstance(mode, SafeFlow) and mode.target is lt
    # scan works on a steering artifact (its policy is a real policy)
    verdicts = scan(loaded, ["how to bomb a thing", "tell me about bread"], lm=tiny_llama)
    assert len(verdicts) == 2
    gens = generate(tiny_llama, ["how to bomb a thing 1"], loaded, "safeflow", max_new_tokens=3)
    assert gens[0].summary.tokens == len(gens[0].token_ids)


def test_target_is_behavioural_and_safeflow_settings_are_stored(tiny_llama, monkeypatch):
    """Default target: refusal vs compliance rows only (no benign answers); the artifact stores the
    validated SafeFlow margin, the refusal-direction basis and the hook's own first_n, and SafeFlow
    built from it edits along the stored direction only."""
    from sapguard.data import attacks

    monkeypatch.setattr(attacks, "family_attacks", lambda family, n=24: list(attacks.HANDWRITTEN))
    cfg = SteeringTrainConfig(
        n_harmful=6,
        n_wrapped=3,
        n_benign=6,
        n_gate=12,
        n_gate_wrapped=6,
        first_n=3,
        steer_first_n=2,
        max_new_tokens=4,
        safeflow_margin=2.5,
    )
    gate = train_steering(tiny_llama, _corpus(), 2, cfg)
    target = target_of(gate)
    assert target is not None
    kinds = {k.split(":")[0] for rows in target.meta["rows"].values() for k in rows}
    assert "benign" not in kinds and "teacher_forced" in kinds
    steering = gate.meta["steering"]
    assert steering["defaults"]["safeflow"] == {"margin": 2.5, "max_steps": 50, "basis": "refusal_direction"}
    assert steering["hook"]["first_n"] == 2
    mode = make_mode("safeflow", gate)
    assert isinstance(mode, SafeFlow) and mode.margin == 2.5 and mode.basis is not None
    u = torch.tensor(steering["direction"])
    assert torch.allclose(mode.basis[0], u / u.norm(), atol=1e-6)
    # edits go *along* the stored direction (toward refusal), never against it (nonnegative cone)
    assert mode.nonnegative
    prompts = [f"how to {w} a thing {i}" for i, w in enumerate(WORDS[:6])]
    gens = generate(tiny_llama, prompts, gate, "safeflow", max_new_tokens=3, threshold=-1e9)
    assert all(abs(t.edit_cosine - 1.0) < 1e-3 for g in gens for t in g.trace if t.edited)


def test_target_benign_rows_are_optional(tiny_llama, monkeypatch):
    from sapguard.data import attacks

    monkeypatch.setattr(attacks, "family_attacks", lambda family, n=24: list(attacks.HANDWRITTEN))
    cfg = SteeringTrainConfig(
        n_harmful=6,
        n_wrapped=3,
        n_benign=6,
        n_gate=12,
        n_gate_wrapped=6,
        first_n=3,
        max_new_tokens=4,
        target_benign=True,
        safeflow_basis=None,
    )
    gate = train_steering(tiny_llama, _corpus(), 2, cfg)
    target = target_of(gate)
    assert target is not None
    assert any(k.startswith("benign:safe") for rows in target.meta["rows"].values() for k in rows)
    assert make_mode("safeflow", gate).basis is None  # type: ignore[attr-defined]
    hook = gate.meta["steering"]["hook"]
    assert hook["tokens"] == "generated" and hook["first_n"] == 3  # default: every generated token


def test_gate_is_a_detector_trained_without_the_bench_held_out_collections(tiny_llama, monkeypatch):
    """The gate uses the detection defaults (4 linear facets, logistic loss), reads the corpus's own
    wrapped rows, never those from the jailbreak collections the bench holds out, and reports its
    validation recall and benign fire rate."""
    from sapguard.data import attacks
    from sapguard.steer import target as target_mod

    monkeypatch.setattr(attacks, "family_attacks", lambda family, n=24: list(attacks.HANDWRITTEN))
    corpus = _corpus()
    for split, n in (("train", 6), ("validation", 3)):
        for i in range(n):
            for fam in ("cipher/rot13", "jailbreak_in_the_wild/t1", "jailbreak_jailbreakchat/AIM"):
                corpus.append(
                    Record(
                        f"{fam} wraps request {i}",
                        is_safe=i % 2 == 0,
                        source="t",
                        group=f"w{split}{fam}{i}",
                        split=split,
                        wrapper=fam,
                    )
                )
    seen: list[Record] = []
    real = target_mod.train_gate

    def spy(lm, records, layer, **kw):
        seen.extend(records)
        return real(lm, records, layer, **kw)

    monkeypatch.setattr(target_mod, "train_gate", spy)
    cfg = SteeringTrainConfig(
        n_harmful=4,
        n_wrapped=2,
        n_gate=None,
        n_gate_wrapped=4,
        n_gate_corpus_wrapped=6,
        first_n=2,
        max_new_tokens=3,
    )
    gate = train_steering(tiny_llama, corpus, 2, cfg)
    wrappers = {r.wrapper for r in seen if r.wrapper}
    assert wrappers == {"cipher/rot13"}  # the in-the-wild / jailbreakchat collections are held out
    assert (
        sum(r.wrapper is None and "+" not in r.source for r in seen if r.split == "train") == 48
    )  # all plain
    assert all(r.split in ("train", "validation") for r in seen)
    assert gate.meta["train_config"]["encoder"]["kind"] == "identity"
    assert gate.meta["train_config"]["loss"] == "logistic"
    report = gate.meta["gate_validation"]
    assert set(report) >= {"recall_plain", "recall_wrapped", "fire_rate_benign_plain", "rows"}
    assert report["rows"] == sum(r.split == "validation" for r in seen)
