"""What the command line reports without a traceback: the base class of every error a user can
cause and fix, and the interruption of a training run.

Each module keeps its own error class (``ConfigError`` in config, ``DataError`` in data, ...)
derived from ``UserError``, so that ``cli.run_stage`` catches one type and imports none of
those modules (they import ``run_stage``: the import graph stays one way).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a params value, an input file, an output path, the network):
    the command line prints its message as one line and exits 2."""


class TrainingInterrupted(Exception):
    """Stopped on request after saving a checkpoint of every completed step."""
