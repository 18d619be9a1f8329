"""What every command-line entry point shares: logging to the terminal and clean errors."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from .errors import TrainingInterrupted, UserError

# FloatingPointError: a non-finite training loss (train.py names the step and what to change).
USER_ERRORS = (UserError, FloatingPointError)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main``: a mistake in params or inputs prints one line and exits 2
    (existing outputs untouched, since every output is written whole or not at all); an
    interrupted run says how to resume and exits 130."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    logging.getLogger("samba").setLevel(logging.INFO)
    try:
        main()
    except USER_ERRORS as err:
        # one line, whatever a library's message (quoted into ours) spreads over
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"[{name}] error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except TrainingInterrupted as err:
        print(f"[{name}] {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print(f"[{name}] stopped at once (second Ctrl-C); the last periodic checkpoint is kept", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
