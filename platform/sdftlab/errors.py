"""Errors a user can cause, each naming the field (or file and line) and the fix.

Every user-facing failure in sdftlab raises one of these with a single message that says
what was wrong, where, and what to do instead. Library bugs raise ordinary exceptions.
"""

from __future__ import annotations


class SdftlabError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(SdftlabError, ValueError):
    """A config value is missing, of the wrong type, or out of range."""


class DataError(SdftlabError, ValueError):
    """A data file is unreadable, malformed, or lacks a required field."""


class LineageError(SdftlabError, KeyError):
    """A model state is unknown, already exists, or is inconsistent."""

    def __str__(self) -> str:  # KeyError would repr() the message; print it plainly
        return str(self.args[0]) if self.args else ""
