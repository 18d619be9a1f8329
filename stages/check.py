"""Stage check: the whole of params.yaml, whichever stage reads each value.

    python stages/check.py --params params.yaml

Every other stage checks the whole file too, but DVC runs a stage only when one of the values it
tracks changes: a key added where no stage looks (``dvc exp run -S +trainig.lr=0.1``, a misspelt
section; a hand edit) would otherwise run nothing and pass for an experiment. This stage tracks
every value, so any change runs it, and it refuses what is unknown, missing or out of range,
naming the key, and a local path (dataset, tokenizer, checkpoint, a teacher written as a path)
that is not there. It writes nothing, and it runs first: a value it refuses leaves dvc.lock as it
was. (A value refused by a later stage leaves this stage's entry in dvc.lock at the refused
params: ``git checkout params.yaml dvc.lock`` brings both back.)
"""

import argparse

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.data import local_dataset_files, local_tokenizer_file
from samba.distill import distilling, require_teacher
from samba.model_files import CheckpointError, local_checkpoint_dir
from samba.paths import written_as_path


def check_local_sources(params) -> None:
    """Every local path params.yaml names exists as what it must be (Hub ids are not fetched)."""
    local_dataset_files(params.dataset.name)
    local_tokenizer_file(params.dataset.tokenizer)
    if params.pretrained.use_pretrained:
        try:
            local_checkpoint_dir(params.pretrained.model_name)
        except CheckpointError as err:
            raise CheckpointError(f"pretrained.model_name: {err}") from None
    # a teacher inside the repository (models/init) may be a later stage's output: DVC checks it
    if distilling(params.training) and written_as_path(params.training.teacher):
        require_teacher(params.training.teacher)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    check_local_sources(load_params(args.params))
    print(f"{args.params}: every value known and in range, every local path there")


if __name__ == "__main__":
    run_stage("check", main)
