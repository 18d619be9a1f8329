"""Stage train: fine-tune with CE(main) + readout_weight * CE(readout) + pruning_weight * L1.

    python stages/train.py --params params.yaml --data data/tokenized --init models/init \
        --out models/samba --metrics metrics/train --checkpoints checkpoints/train
"""

import argparse

from samba.cli import run_stage
from samba.config import load_params
from samba.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/tokenized")
    parser.add_argument("--init", default="models/init")
    parser.add_argument("--out", default="models/samba")
    parser.add_argument("--metrics", default="metrics/train")
    parser.add_argument("--checkpoints", default="checkpoints/train",
                        help="resumable state, kept until the run completes")
    args = parser.parse_args()
    params = load_params(args.params)
    summary = train(params, args.data, args.init, args.out, args.metrics, args.checkpoints)
    print(f"wrote {args.out}: {summary}")


if __name__ == "__main__":
    run_stage("train", main)
