"""The train stage's throughput (dvclive's train/tokens_per_s) next to the benchmark's step a.

    python benchmarks/stage_throughput.py METRICS_DIR benchmarks/results/train_step.json [--batch 16]

METRICS_DIR is a train stage's dvclive directory (metrics/train). The first logged window holds
the warm-up, compilation and CUDA-graph capture and is left out.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_dir", type=Path)
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--batch", type=int, default=16, help="the stage's training.batch_size")
    args = parser.parse_args()
    with open(args.metrics_dir / "plots/metrics/train/tokens_per_s.tsv") as f:
        values = [float(r["tokens_per_s"]) for r in csv.DictReader(f, delimiter="\t")][1:]
    bench = {(r["key"], r.get("batch", 16)): r for r in json.loads(args.bench_json.read_text())["results"]
             if "error" not in r}
    a = bench[("a", args.batch)]["tokens_per_s"]
    mean = statistics.fmean(values)
    print(f"train stage: {len(values)} logged windows, tokens/s mean {mean:,.0f}, median "
          f"{statistics.median(values):,.0f}, range {min(values):,.0f}-{max(values):,.0f}")
    print(f"benchmark a at batch {args.batch}: {a:,.0f} tokens/s; stage / benchmark = {mean / a:.3f} "
          f"({'within' if mean / a >= 0.95 else 'NOT within'} 5%)")


if __name__ == "__main__":
    main()
