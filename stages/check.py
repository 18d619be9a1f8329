"""Stage check: the whole of params.yaml, whichever stage reads each value.

    python stages/check.py --params params.yaml

Every other stage checks the whole file too, but DVC runs a stage only when one of the values it
tracks changes: a key added where no stage looks (``dvc exp run -S +trainig.lr=0.1``, a misspelt
section; a hand edit) would otherwise run nothing and pass for an experiment. This stage tracks
every value, so any change runs it, and it refuses what is unknown, missing or out of range,
naming the key. It writes nothing.
"""

import argparse

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    load_params(args.params)
    print(f"{args.params}: every value known and in range")


if __name__ == "__main__":
    run_stage("check", main)
