"""The error types cryofire raises for problems a user can fix.

Every error a user is expected to see derives from :class:`CryofireError`; the command line
catches it and prints its one-line message instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class CryofireError(Exception):
    """A problem the user can fix (bad input, bad option, missing file)."""


class InputError(CryofireError):
    """A bad input file. The message names the file, the place (row, key) and the problem."""

    def __init__(self, path: str | Path, problem: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ConfigError(CryofireError):
    """A bad option or configuration value. The message names the key."""
