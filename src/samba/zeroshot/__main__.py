"""``python -m samba.zeroshot``: the evaluation command, or ``compare`` (see ``command``)."""

from ..cli import run_stage
from .command import main

if __name__ == "__main__":
    # ZeroShotError is a samba.data.DataError: run_stage turns it into one line and exit 2
    run_stage("zeroshot", main)
