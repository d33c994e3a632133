"""Hook placement, layer numbering and padding, exactly against output_hidden_states."""

from __future__ import annotations

import pytest
import torch

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.features.extract import extract_features
from sapguard.features.hooks import LayerReader, left_pad
from sapguard.models.chat import encode_pair, encode_prompt
from sapguard.models.layers import find_decoder_blocks, resolve_layer


def test_finds_blocks_of_every_family(tiny_lm):
    assert len(find_decoder_blocks(tiny_lm.model)) == 4


@pytest.mark.parametrize("layer", [1, 2, 3, -2])
def test_hook_reads_hidden_states_of_layer_exactly(tiny_lm, layer):
    ids = encode_prompt(tiny_lm.tokenizer, "how do i bake bread", "chat")
    inputs = left_pad([ids], tiny_lm.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        reference = tiny_lm.model(**inputs, output_hidden_states=True).hidden_states
        with LayerReader(tiny_lm.model, layer) as reader:
            got = reader.run(**inputs)
    assert torch.equal(got, reference[resolve_layer(layer, 4)])


def test_stop_reader_matches_full_forward(tiny_llama):
    ids = encode_prompt(tiny_llama.tokenizer, "tell me about war history", "chat")
    inputs = left_pad([ids], 0, torch.device("cpu"))
    with torch.no_grad():
        reference = tiny_llama.model(**inputs, output_hidden_states=True).hidden_states[2]
        with LayerReader(tiny_llama.model, 2, stop=True) as reader:
            got = reader.run(**inputs)
    assert torch.equal(got, reference)


def test_hook_is_removed(tiny_llama):
    block = find_decoder_blocks(tiny_llama.model)[0]
    with LayerReader(tiny_llama.model, 1):
        assert len(block._forward_hooks) == 1
    assert len(block._forward_hooks) == 0


@pytest.mark.parametrize("layer", [0, 5, -5])
def test_layer_out_of_range(layer):
    with pytest.raises(SapError, match="out of range"):
        resolve_layer(layer, 4)


def test_batched_left_padded_equals_one_by_one(tiny_lm):
    records = [
        Record("how do i bake bread", "explain the history", True),
        Record("what is a knife", None, True),
        Record("please tell me how do i hack into wifi and steal card password", "you can buy a weapon", False),
    ]
    for policy in ("last_prompt", "last_response", "response_tokens"):
        batched, index, _pos = extract_features(tiny_lm, records, 2, policy=policy, batch_size=8)
        alone = [extract_features(tiny_lm, [r], 2, policy=policy, batch_size=1)[0] for r in records]
        assert torch.allclose(batched, torch.cat(alone), atol=1e-5), policy
        assert index.tolist() == sorted(index.tolist())


def test_last_token_is_last_real_token_not_pad(tiny_llama):
    record = Record("what is a knife", "a weapon", False)
    feats, _, pos = extract_features(tiny_llama, [record], 3, policy="last_response")
    ids, _ = encode_pair(tiny_llama.tokenizer, record.prompt, record.response, "chat")
    with torch.no_grad():
        hs = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3]
    assert pos.tolist() == [len(ids) - 1]
    assert torch.allclose(feats[0], hs[0, -1], atol=1e-5)


def test_response_tokens_policy_reads_every_response_token(tiny_llama):
    record = Record("what is a knife", "a weapon to sell", False)
    _, n_prompt = encode_pair(tiny_llama.tokenizer, record.prompt, record.response, "chat")
    _, _, pos = extract_features(tiny_llama, [record], 1, policy="response_tokens")
    assert pos.tolist() == [n_prompt, n_prompt + 1, n_prompt + 2, n_prompt + 3]


def test_template_is_applied(tiny_llama):
    ids = encode_prompt(tiny_llama.tokenizer, "bake bread", "chat")
    text = tiny_llama.tokenizer.decode(ids)
    assert "<|im_start|>" in text and text.rstrip().endswith("assistant")
    assert encode_prompt(tiny_llama.tokenizer, "bake bread", "none") != ids
