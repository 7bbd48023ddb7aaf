"""Channel importance: scorers return :class:`Scores` (one 1-D tensor per site)."""
from .scores import Scores

__all__ = ["Scores"]
