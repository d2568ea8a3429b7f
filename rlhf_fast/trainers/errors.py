"""Errors that are the user's to fix, not bugs of ours.

The ``rlhf-fast`` command prints a ``UserError`` as one line on stderr and exits with its ``exit_code``, no
traceback; any other exception is a bug and keeps its traceback. All of them are ``ValueError`` subclasses, so
code that catches ``ValueError`` for bad input keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config, a data file, a checkpoint, an output directory in use."""

    exit_code = 2


class CheckpointError(UserError):
    """``resume_from`` names a checkpoint that is damaged, incomplete, or of another trainer."""


class OutputDirBusy(UserError):
    """Another run holds the output directory's lock."""


class NonFiniteError(UserError):
    """A NaN or an infinity where training cannot go on: a reward, a margin, a loss, a gradient norm."""

    exit_code = 3
