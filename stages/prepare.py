"""Stage prepare: read the dataset and tokenizer (Hub or local) and write token arrays.

    python stages/prepare.py --params params.yaml --out data/tokenized
"""

import argparse

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.data import prepare_tokens
from samba.io import require_writable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/tokenized")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    require_writable(args.out)
    meta = prepare_tokens(params.dataset, args.out)
    print(f"wrote {args.out}: {meta['tokens']} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']})")


if __name__ == "__main__":
    run_stage("prepare", main)
