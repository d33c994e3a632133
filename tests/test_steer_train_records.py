"""train_steering computes the training families' attacks once and hands them to gate_records."""

from __future__ import annotations

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
