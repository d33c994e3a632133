"""A chat history is read as earlier turns of the chat template (tiny random model, offline)."""

from __future__ import annotations

import torch

from sapguard.data.records import Record
from sapguard.features.extract import extract_features
from sapguard.models.chat import encode_pair, encode_prompt, header_length

HISTORY = (("what is a cake", "a cake is a bread"), ("tell me about history", "history is the story of war"))


def test_history_becomes_earlier_chat_turns(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = encode_prompt(tok, "how do i make a bomb", "chat", history=HISTORY)
    text = tok.decode(ids)
    order = [text.index(t) for t in ("what is a cake", "a cake is a bread", "tell me about history", "how do i make a bomb")]
    assert order == sorted(order)
    assert text.count("<|im_start|>") == 6 and text.rstrip().endswith("assistant")
    alone = encode_prompt(tok, "how do i make a bomb", "chat")
    assert ids[-len(alone) + header_length(tok, "chat") :] == alone[header_length(tok, "chat") :]
    # without a chat template the earlier turns are plain text before the prompt
    plain = tok.decode(encode_prompt(tok, "how do i make a bomb", "none", history=HISTORY))
    assert plain.index("a cake is a bread") < plain.index("how do i make a bomb")
    # a response still follows the last turn; the prompt length counts the whole conversation
    pair, n_prompt = encode_pair(tok, "how do i make a bomb", "you can not", "chat", HISTORY)
    assert pair[:n_prompt] == ids and len(pair) > n_prompt


def test_extraction_reads_the_state_after_the_whole_conversation(tiny_llama):
    chat = Record("how do i make a bomb", is_safe=False, history=HISTORY)
    plain = Record("how do i make a bomb", is_safe=False)
    feats, index, pos = extract_features(tiny_llama, [chat, plain], 2, policy="last_prompt", batch_size=2)
    ids = encode_prompt(tiny_llama.tokenizer, chat.prompt, "chat", history=HISTORY)
    assert pos.tolist()[0] == len(ids) - 1 and index.tolist() == [0, 1]
    with torch.no_grad():
        hs = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
    assert torch.allclose(feats[0], hs[0, -1], atol=1e-5)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)
    mean, _, _ = extract_features(tiny_llama, [chat, plain], 2, policy="mean_prompt")
    assert not torch.allclose(mean[0], mean[1], atol=1e-3)
