"""Stage evaluate: test-split perplexity, accuracy and prune curve of both heads and
chunk-output sparsity, for the trained model and its baseline (the convert output), plus plots.

    python stages/evaluate.py --params params.yaml --data data/tokenized --baseline models/init \
        --model models/samba --out metrics/eval.json --plots metrics/plots
"""

import argparse
import json

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.evaluate import evaluate_pipeline
from samba.io import require_writable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/tokenized")
    parser.add_argument("--baseline", default="models/init")
    parser.add_argument("--model", default="models/samba")
    parser.add_argument("--out", default="metrics/eval.json")
    parser.add_argument("--plots", default="metrics/plots")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    require_writable(args.out, f"{args.plots}/prune_curve.json")  # a file the plots folder will hold
    metrics = evaluate_pipeline(params, args.data, args.baseline, args.model, args.out, args.plots)
    shown = {k: metrics[k] for k in ("ppl", "readout_ppl", "ppl_ratio", "accuracy")}
    shown["baseline_ppl"] = metrics["baseline"]["ppl"]
    shown["l0"] = metrics["sparsity"]["l0"]
    shown["near_zero_rel"] = metrics["sparsity"]["near_zero_rel"]
    print(f"wrote {args.out}: {json.dumps(shown)}")


if __name__ == "__main__":
    run_stage("evaluate", main)
