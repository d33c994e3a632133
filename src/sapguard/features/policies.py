"""Token policies: which positions of a (prompt, response) sequence become feature rows."""

from __future__ import annotations

from sapguard.errors import SapError

POLICIES = ("last_prompt", "mean_prompt", "last_response", "response_tokens")
"""``last_prompt``: the last token of the templated prompt (detection of requests; the paper's).
``mean_prompt``: the mean over the prompt's own tokens (the user text and the generation prompt,
not the template's fixed header), one row per text. ``last_response``: the last token of prompt +
response (detection of exchanges; the prompt's last token when there is no response).
``response_tokens``: every response token (steering)."""

POOLED = frozenset({"mean_prompt"})
"""Policies whose positions are averaged into one row per text."""


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise SapError(f"unknown token policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy


def read_positions(policy: str, length: int, prompt_length: int, content_start: int = 0) -> list[int]:
    """Positions (0-based, in the unpadded sequence) to read for one sequence.

    Args:
        content_start: First position of the prompt's own text (after a fixed template header);
            used by ``mean_prompt``.
    """
    if policy == "last_prompt":
        return [prompt_length - 1]
    if policy == "mean_prompt":
        return list(range(min(content_start, prompt_length - 1), prompt_length))
    if policy == "last_response":
        return [length - 1]
    return list(range(prompt_length, length))
