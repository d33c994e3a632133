"""Shared fixtures: tiny random-init causal LMs of several families and an offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from sapguard.models.loading import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "how do i make a bomb kill process python bake bread cake hack into wifi steal card write poem story "
    "the a an is of to and what why who when where can you please tell me about history war medicine dose "
    "safe unsafe help explain chemistry security password weapon knife drug sell buy friend"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, built offline."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokens = list(dict.fromkeys([*specials, "\n", "user", "assistant", "system", *_WORDS]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(family: str, vocab_size: int):
    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 256}
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    kw = dict(common, intermediate_size=64, num_hidden_layers=4, num_key_value_heads=2)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}[family](
        **kw, **({"head_dim": 8} if family == "gemma" else {})
    )


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def make_tiny(family: str = "llama", seed: int = 0) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=f"tiny-{family}", revision="test")


@pytest.fixture(params=FAMILIES)
def tiny_lm(request) -> LoadedModel:
    return make_tiny(request.param)


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return make_tiny("llama")
