"""Decoder-block discovery on mixture-of-experts models, exactly against output_hidden_states.

transformers 5 fuses a layer's experts into one module, but 4.x (and many remote-code MoE models)
keep them in a ``ModuleList`` per block, longer than the block list itself: "the largest
ModuleList" then picks an expert list. ``with_expert_lists`` re-creates that layout on a real tiny
model by hanging an (unused) expert ``ModuleList`` in every block.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from sapguard.errors import SapError
from sapguard.features.hooks import LayerReader, left_pad
from sapguard.models.chat import encode_prompt
from sapguard.models.layers import block_for_layer, find_decoder_blocks, resolve_layer
from tests.conftest import tiny_tokenizer

N_BLOCKS = 3
N_EXPERTS = 8


def _moe_config(family: str, vocab_size: int) -> MixtralConfig | Qwen2MoeConfig:
    common = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_BLOCKS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256,
    }
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=N_EXPERTS)
    return Qwen2MoeConfig(
        **common, num_experts=N_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        decoder_sparse_step=1, mlp_only_layers=[],
    )


def _tiny_moe(family: str, *, with_expert_lists: bool) -> tuple[nn.Module, object]:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_moe_config(family, len(tokenizer)), dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if with_expert_lists:
        for block in model.model.layers:
            block.mlp.expert_list = nn.ModuleList(nn.Linear(32, 32) for _ in range(N_EXPERTS))
    model.eval()
    return model, tokenizer


FAMILIES = ["mixtral", "qwen2_moe"]


@pytest.mark.parametrize("with_expert_lists", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_decoder_blocks_not_an_expert_list(family, with_expert_lists):
    model, _ = _tiny_moe(family, with_expert_lists=with_expert_lists)
    blocks = find_decoder_blocks(model)
    assert blocks is model.model.layers
    assert len(blocks) == N_BLOCKS


@pytest.mark.parametrize("layer", [1, 2, -2])
@pytest.mark.parametrize("family", FAMILIES)
def test_hook_reads_hidden_states_of_layer_exactly(family, layer):
    model, tokenizer = _tiny_moe(family, with_expert_lists=True)
    ids = encode_prompt(tokenizer, "how do i bake bread", "chat")
    inputs = left_pad([ids, ids[2:]], tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True).hidden_states
        with LayerReader(model, layer) as reader:
            got = reader.run(**inputs)
    assert len(reference) == N_BLOCKS + 1
    assert torch.equal(got, reference[resolve_layer(layer, N_BLOCKS)])


def test_path_template_escape_hatch_and_negative_indices():
    model, _ = _tiny_moe("mixtral", with_expert_lists=True)
    experts = model.model.layers[1].mlp.expert_list
    assert find_decoder_blocks(model, "model.layers.1.mlp.expert_list.{num}") is experts
    assert block_for_layer(model, -1, "model.layers.1.mlp.expert_list.{num}") is experts[-1]
    assert block_for_layer(model, -1) is model.model.layers[-1]
    assert block_for_layer(model, 1) is model.model.layers[0]
    with pytest.raises(SapError, match="does not exist"):
        find_decoder_blocks(model, "model.blocks.{num}")
    with pytest.raises(SapError, match="not a ModuleList"):
        find_decoder_blocks(model, "model.embed_tokens.{num}")


class _Block(nn.Module):
    def __init__(self, n_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(n_experts))


def test_ranking_without_a_config():
    """No config to consult: top-level and conventionally named lists still beat expert lists."""
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList(_Block(16) for _ in range(2))
    model.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    assert find_decoder_blocks(model) is model.transformer.h
    empty = nn.Module()
    empty.layers = nn.ModuleList()
    with pytest.raises(SapError, match="could not find decoder blocks"):
        find_decoder_blocks(empty)


def test_config_length_picks_the_language_model_of_a_multimodal_model():
    """Two top-level ``layers`` lists (vision tower, language model): the config's count decides."""
    model = nn.Module()
    model.vision_tower = nn.Module()
    model.vision_tower.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    model.language_model = nn.Module()
    model.language_model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    model.config = MixtralConfig(num_hidden_layers=4)
    assert find_decoder_blocks(model) is model.language_model.layers
