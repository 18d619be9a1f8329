"""Stage evaluate: test-split perplexity, accuracy and prune curve of both heads and
chunk-output sparsity, for the trained model and its baseline (the convert output), plus plots.

    python stages/evaluate.py --params params.yaml --data data/tokenized --baseline models/init \
        --model models/samba --out metrics/eval.json --summary metrics/eval_summary.json --plots metrics/plots

metrics/eval.json is the full record; metrics/eval_summary.json its headline, what DVC tabulates.
"""

import argparse
import json

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.evaluate import evaluate_pipeline, headline
from samba.io import require_writable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/tokenized")
    parser.add_argument("--baseline", default="models/init")
    parser.add_argument("--model", default="models/samba")
    parser.add_argument("--out", default="metrics/eval.json")
    parser.add_argument("--summary", default="metrics/eval_summary.json")
    parser.add_argument("--plots", default="metrics/plots")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    require_writable(args.out, args.summary, f"{args.plots}/prune_curve.json")  # a file the plots folder will hold
    metrics = evaluate_pipeline(params, args.data, args.baseline, args.model, args.out, args.plots, args.summary)
    print(f"wrote {args.out} and {args.summary}: {json.dumps(headline(metrics))}")


if __name__ == "__main__":
    run_stage("evaluate", main)
