"""What every stage script shares: logging to the terminal and clean errors."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import ConversionError
from .data import DataError
from .evaluate import QualityError
from .hub import HubUnavailableError

USER_ERRORS = (ConfigError, DataError, CheckpointError, HubUnavailableError, ConversionError,
               QualityError, FloatingPointError)


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main``: a mistake in params or inputs prints one line and exits 2
    (existing outputs untouched, since every output is written whole or not at all)."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    logging.getLogger("samba").setLevel(logging.INFO)
    try:
        main()
    except USER_ERRORS as err:
        print(f"[{name}] error: {err}", file=sys.stderr)
        sys.exit(2)
