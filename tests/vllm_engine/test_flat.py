"""The engine-agnostic core on synthetic flattened batches (no engine): row -> request mapping
under continuous batching (prefill chunks and decode rows mixed), gating and edits."""

from __future__ import annotations

import pytest
import torch

from sapguard.engines.flat import FlatGuard, GuardConfig, StepRequests
from sapguard.errors import SapError
from sapguard.polytope.model import EncoderSpec, SafetyPolytope


@pytest.fixture
def poly():
    torch.manual_seed(0)
    p = SafetyPolytope(8, 3, EncoderSpec(kind="identity"), meta={"layer": 2})
    with torch.no_grad():
        p.phi.zero_()
        p.phi[0, 0] = 1.0  # facet 0 fires when h[0] > 1
        p.xi.fill_(1.0)
    return p.eval().requires_grad_(False)


def test_rows_map_to_requests_across_chunked_prefill(poly):
    guard = FlatGuard(poly, GuardConfig(mode="detect", tokens="all"), hidden_size=8, num_layers=4)
    # step 1: request a's first prompt chunk (positions 0..2 of a 5-token prompt) + request b's whole 2-token prompt
    h = torch.zeros(5, 8)
    h[4, 0] = 3.0  # b's last prompt position fires
    guard.step(h, torch.tensor([0, 1, 2, 0, 1]), StepRequests(["a-1", "b-2"], [0, 3, 5], [5, 2], ["detect", "detect"]))
    assert guard.records["a-1"].prompt_margins is None  # its last prompt position has not run yet
    assert guard.records["b-2"].prompt_margins[0] == pytest.approx(2.0) and guard.records["b-2"].active
    # step 2: b decodes (position 2 = generated index 1), a's second chunk ends its prompt (positions 3, 4)
    h = torch.zeros(3, 8)
    h[2, 0] = 0.5
    guard.step(h, torch.tensor([2, 3, 4]), StepRequests(["b-2", "a-1"], [0, 1, 3], [2, 5], ["detect", "detect"]))
    a = guard.records["a-1"]
    assert a.prompt_margins[0] == pytest.approx(-0.5) and a.active is False
    assert sorted(guard.records["b-2"].scores) == [0, 1]
    found = guard.pop(["a", "b"])
    assert set(found) == {"a", "b"} and not guard.records  # external ids find "{id}-{suffix}"


def test_edits_only_violating_rows_of_editing_requests(poly):
    guard = FlatGuard(poly, GuardConfig(mode="safeflow", tokens="generated", gate="position"), hidden_size=8, num_layers=4)
    h = torch.zeros(4, 8)
    h[:, 0] = torch.tensor([5.0, 5.0, 5.0, 0.0])
    # rows: r1 decode (fires, safeflow) | r2 decode (fires, detect) | r3 decode (fires, off) | r4 decode (safe, safeflow)
    delta = guard.step(h, torch.tensor([7, 7, 7, 7]), StepRequests(
        ["r1", "r2", "r3", "r4"], [0, 1, 2, 3, 4], [3, 3, 3, 3], ["safeflow", "detect", "off", "safeflow"]))
    assert delta is not None
    changed = (delta != 0).any(-1).tolist()
    assert changed == [True, False, False, False]
    assert poly.margins(h[0] + delta[0]).max() <= 0
    assert "r3" not in guard.records and guard.records["r1"].edited_tokens == 1


def test_nothing_edited_returns_none(poly):
    guard = FlatGuard(poly, GuardConfig(mode="safeflow"), hidden_size=8, num_layers=4)
    assert guard.step(torch.zeros(2, 8), torch.tensor([0, 1]), StepRequests(["x"], [0, 2], [2], ["safeflow"])) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GuardConfig(mode="teleport"), "unknown sapguard mode"),
        (GuardConfig(mode="redirect"), "not available"),
        (GuardConfig(layer=9), "out of range"),
        (GuardConfig(tokens="some"), "unknown token policy"),
        (GuardConfig(capture="all"), "unknown capture"),
    ],
)
def test_bad_config(poly, config, message):
    with pytest.raises(SapError, match=message):
        FlatGuard(poly, config, hidden_size=8, num_layers=4)


def test_other_hidden_size(poly):
    with pytest.raises(SapError, match="hidden size 8"):
        FlatGuard(poly, GuardConfig(), hidden_size=576, num_layers=30)
