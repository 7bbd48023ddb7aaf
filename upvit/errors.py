"""The one exception type users see: its message names the problem and the fix."""
from __future__ import annotations


class UpvitError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""


class BadImageError(UpvitError):
    """An image file that cannot be decoded; ``path`` names it (None when re-raised by a DataLoader worker)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
