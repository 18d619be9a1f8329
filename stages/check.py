"""Stage check: the whole of params.yaml, whichever stage reads each value.

    python stages/check.py --params params.yaml

Every other stage checks the whole file too, but DVC runs a stage only when one of the values it
tracks changes: a key added where no stage looks (``dvc exp run -S +trainig.lr=0.1``, a misspelt
section; a hand edit) would otherwise run nothing and pass for an experiment. This stage tracks
every value, so any change runs it, and it refuses what is unknown, missing or out of range,
naming the key, and a local path that a stage is about to read and is not there
(samba.preflight: the dataset, tokenizer or checkpoint of a stage dvc.lock says will run; the
teacher, unless it is a stage's output). It writes nothing, and it runs first: a value it refuses
leaves dvc.lock as it was. (A value refused by a later stage leaves this stage's entry in dvc.lock
at the refused params: ``touch params.yaml dvc.lock && git checkout params.yaml dvc.lock`` brings
both back; docs/failures.md.)
"""

import argparse
from pathlib import Path

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.preflight import check_local_sources


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    check_local_sources(load_params(args.params), Path(args.params).parent)
    print(f"{args.params}: every value known and in range, every local path there")


if __name__ == "__main__":
    run_stage("check", main)
