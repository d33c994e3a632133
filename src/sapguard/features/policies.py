"""Token policies: which positions of a (prompt, response) sequence become feature rows."""

from __future__ import annotations

from sapguard.errors import SapError

POLICIES = ("last_prompt", "last_response", "response_tokens")
"""``last_prompt``: the last token of the templated prompt (detection of requests).
``last_response``: the last token of prompt + response (detection of exchanges; the prompt's last
token when there is no response). ``response_tokens``: every response token (steering)."""


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise SapError(f"unknown token policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy


def read_positions(policy: str, length: int, prompt_length: int) -> list[int]:
    """Positions (0-based, in the unpadded sequence) to read for one sequence."""
    if policy == "last_prompt":
        return [prompt_length - 1]
    if policy == "last_response":
        return [length - 1]
    return list(range(prompt_length, length))
