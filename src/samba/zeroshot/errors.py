"""The package's error, in its own module so that every part of the package can raise it."""

from __future__ import annotations

from ..data import DataError


class ZeroShotError(DataError):
    """A task, its data, a request or a results file cannot be used as asked."""
