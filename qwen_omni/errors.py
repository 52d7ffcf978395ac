"""Typed errors raised at the library's boundaries.

Every error a user can cause (a bad checkpoint path, a prompt that does not fit, a bad upload) is one of these,
with a message that says what happened and what to change. Callers (app, server, CLI) catch `QwenOmniError`
and show the message; anything else is a bug.
"""
from __future__ import annotations


class QwenOmniError(Exception):
    """Base class of every error a user can cause."""


class CheckpointError(QwenOmniError):
    """The checkpoint cannot be found, is in a format we refuse, or does not match the architecture."""


class ContextOverflowError(QwenOmniError, ValueError):
    """The prompt (after expanding media placeholders) does not fit the model's context window."""


class InputError(QwenOmniError, ValueError):
    """A malformed request: bad message structure, placeholder/feature mismatch, over-budget media."""
