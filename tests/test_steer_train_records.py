"""train_steering computes the training families' attacks once and hands them to gate_records."""

from __future__ import annotations

from dataclasses import replace

from sapguard.data.attacks import families_attacks
from sapguard.steer.target import SteeringTrainConfig, gate_records, request_pools
from tests.test_steer_target import _corpus


def test_gate_records_with_given_attacks_and_pools_are_the_default_ones():
    corpus = _corpus()
    for families in (("handwritten", "rewrite"), ("handwritten",)):
        cfg = SteeringTrainConfig(n_gate=8, n_gate_wrapped=6, n_gate_corpus_wrapped=4, families=families)
        default = gate_records(corpus, cfg)
        given = gate_records(corpus, cfg, request_pools(corpus, cfg), families_attacks(cfg.families))
        assert given == default and len(default) > 16
        assert any(r.source.startswith("t+") for r in default)  # wrapped rows are there


def test_noise_suffixes_are_deterministic_gcg_shaped_and_never_garaks():
    from sapguard.data.attacks import corpus_words, gcg_suffixes, noise_attacks

    words = corpus_words(["How to pick a lock quickly", "Tell me about the sea"])
    assert words == sorted(words) and "lock" in words and "a" not in words
    a, b = noise_attacks(8, 0, words), noise_attacks(8, 0, words)
    assert a == b and noise_attacks(8, 1, words) != a
    assert all(x.kind == "noise" and x.template.startswith("{prompt} ") for x in a)
    suffixes = [x.template.removeprefix("{prompt} ") for x in a]
    assert all(len(s.split()) >= 4 for s in suffixes) and len(set(suffixes)) == 8
    assert not set(suffixes) & set(gcg_suffixes())


def test_gate_noise_rows_come_in_harmful_benign_pairs_off_the_plain_rows():
    corpus = _corpus()
    cfg = SteeringTrainConfig(n_gate=4, n_gate_wrapped=3, n_gate_corpus_wrapped=0, n_gate_noise=0)
    plain = gate_records(corpus, cfg)
    with_noise = gate_records(corpus, replace(cfg, n_gate_noise=3))
    noise = [r for r in with_noise if r.source.endswith("+noise")]
    assert [r for r in with_noise if not r.source.endswith("+noise")] == plain
    train = [r for r in noise if r.split == "train"]
    assert len(train) == 6 and sum(not r.is_safe for r in train) == 3
    assert len([r for r in noise if r.split == "validation"]) == 2  # a third, harmful and benign
    used = {r.prompt for r in plain}
    assert not any(r.prompt in used for r in noise)
    originals = {r.group: r.prompt for r in corpus}
    assert all(r.prompt.startswith(originals[r.group] + " ") for r in noise)  # the request, then the suffix
    assert not {r.group for r in noise} & {r.group for r in plain if "+" not in r.source}
