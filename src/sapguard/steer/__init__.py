"""Steering at inference time: hooks, modes, traces, steered generation and the steering data set."""

from sapguard.steer.generate import DEFAULT_REFUSAL, Generation, generate
from sapguard.steer.hook import TOKEN_POLICIES, SteeringHook, steer
from sapguard.steer.modes import MODES, AddDirection, Detect, Redirect, SafeFlow, SteeringMode, make_mode
from sapguard.steer.trace import TokenTrace, TraceStep, TraceSummary

__all__ = [
    "DEFAULT_REFUSAL",
    "MODES",
    "TOKEN_POLICIES",
    "AddDirection",
    "Detect",
    "Generation",
    "Redirect",
    "SafeFlow",
    "SteeringHook",
    "SteeringMode",
    "TokenTrace",
    "TraceStep",
    "TraceSummary",
    "generate",
    "make_mode",
    "steer",
]
