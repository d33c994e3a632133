"""Shared pieces of the steering data: teacher-forced refusals and mean-difference directions.

The steering artifact itself (gate + behavioural target) is built by :mod:`sapguard.steer.target`.
"""

from __future__ import annotations

import logging

import torch

from sapguard.errors import SapError

logger = logging.getLogger(__name__)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. If you have another question, I'm happy to help.",
    "I'm not able to provide that information because it could cause real harm.",
    "I won't assist with this. It could hurt people.",
    "Sorry, I can't do that. Is there something else I can help you with?",
    "I cannot provide instructions for that. It is dangerous and may be illegal.",
    "I'm unable to help with this request.",
    "That's not something I can help with, as it could put people at risk.",
    "I must decline. Helping with this could lead to serious harm.",
    "I can't assist with that, but I can point you to safer resources if you need support.",
    "I'm sorry, I cannot fulfil this request.",
    "No, I won't help with that. It's harmful and against my guidelines.",
    "I apologize, but I can't provide guidance on this topic.",
    "I can't create that content. It could be used to harm others.",
    "This request asks for something harmful, so I have to refuse.",
    "I'm not going to help with that. If you're in a difficult situation, please reach out to someone you trust.",
    "As an AI assistant, I can't help with illegal or dangerous activities.",
    "I can't give you that. Let me know if there's something else you'd like to talk about.",
    "I'm sorry, but providing this would be unsafe and unethical.",
    "I cannot help plan or carry out anything that could hurt someone.",
    "Unfortunately, I can't help with that request.",
    "I'd rather not help with this, because it could cause harm. Can I help with something else?",
    "I'm unable to write that. It promotes harm.",
    "I can't support this request. Please consider the consequences for the people involved.",
    "I won't provide that information.",
    "Sorry, that's not something I'm able to do.",
    "I cannot comply with this request because it could facilitate harm.",
    "I'm afraid I can't help with that one.",
    "It would be irresponsible for me to help with that, so I won't.",
    "I can't help you do that, but if you want, I can explain why it's risky and what safer options exist.",
)
"""Teacher-forced refusals: varied openings, lengths and justifications, so the polytope learns
"refusing" rather than one sentence."""


def mean_direction(x: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``mean(x[positive]) - mean(x[negative])`` as a ``[d]`` float32 tensor."""
    if not bool(positive.any()) or not bool(negative.any()):
        raise SapError("a mean-difference direction needs rows on both sides")
    return (x[positive].float().mean(0) - x[negative].float().mean(0)).float()
