"""How text becomes token ids: the same chat-template policy for extraction, detection and steering.

Templates:
    ``"chat"``: the tokenizer's chat template with the prompt as the user turn and the generation
        prompt appended; a response is appended as the raw tokens the model would generate,
        without an end-of-turn marker, so feature reads match generation-time states.
    ``"none"``: the raw prompt (with the tokenizer's special tokens, e.g. BOS), response appended.
    ``"auto"``: ``"chat"`` when the tokenizer has a chat template, else ``"none"``.

A chat history (earlier ``(user, assistant)`` turns, :attr:`sapguard.data.records.Record.history`)
becomes earlier turns of the chat template, so the prompt's last token is read after the whole
conversation; under ``"none"`` the earlier turns are prepended as plain text, one per paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sapguard.errors import SapError

TEMPLATES = ("auto", "chat", "none")


def resolve_template(tokenizer: Any, template: str) -> str:
    """Resolve ``"auto"`` and check that ``"chat"`` is possible for this tokenizer."""
    if template not in TEMPLATES:
        raise SapError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "none"
    if template == "chat" and not has_chat:
        raise SapError("the tokenizer has no chat template; use template 'none'")
    return template


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    template: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """Token ids of a prompt ready for generation under ``template`` (already resolved).

    Args:
        system: Optional system turn before the user turn (chat template only).
        history: Earlier ``(user, assistant)`` turns, oldest first; ``prompt`` is the last user turn.
    """
    if template == "chat":
        turns = [{"role": "system", "content": system}] if system is not None else []
        for user, assistant in history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        text = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if system is not None:
        raise SapError("a system prompt needs the chat template")
    text = "\n\n".join([*(turn for pair in history for turn in pair), prompt])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_pair(
    tokenizer: Any, prompt: str, response: str | None, template: str, history: Sequence[tuple[str, str]] = ()
) -> tuple[list[int], int]:
    """Token ids of (history +) prompt + response and the number of prompt tokens.

    The response is tokenised on its own and appended, exactly as generated tokens follow the
    prompt during generation.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, template, history=history)
    if not response:
        return prompt_ids, len(prompt_ids)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids + response_ids, len(prompt_ids)


def header_length(tokenizer: Any, template: str) -> int:
    """Number of leading tokens every prompt shares under ``template`` (system turn, role markers).

    Measured as the common prefix of two unrelated prompts' encodings, so it follows whatever the
    tokenizer's chat template puts before the user text.
    """
    a = encode_prompt(tokenizer, "alpha", template)
    b = encode_prompt(tokenizer, "Zebra 42?", template)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
