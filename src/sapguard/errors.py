"""Errors raised for bad input. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class SapError(ValueError):
    """A problem with user input (a file, an option, an artifact) that the user can fix.

    The message is a single line that names the offending file or value and what is wrong.
    """


class ArtifactMismatchError(SapError):
    """An artifact or features directory was made for another model, layer or configuration."""
