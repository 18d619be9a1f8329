"""The train stage's throughput (dvclive's train/tokens_per_s) next to the benchmark's step a.

    python benchmarks/stage_throughput.py METRICS_DIR benchmarks/results/2026-11-30/train_step.json [--batch 16]

METRICS_DIR is a train stage's dvclive directory (metrics/train). The first logged window holds
the warm-up, compilation and CUDA-graph capture and is left out. ``scaling.py`` reads its runs
with the same two functions.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path


def stage_tokens_per_s(metrics_dir: Path) -> list[float]:
    """The stage's tokens/s per logged window, the first (warm-up, compilation, capture) left out."""
    with open(Path(metrics_dir) / "plots/metrics/train/tokens_per_s.tsv") as f:
        return [float(r["tokens_per_s"]) for r in csv.DictReader(f, delimiter="\t")][1:]


def benchmark_a(bench_json: Path) -> dict[int, float]:
    """train_step.py's step a: batch size -> tokens/s."""
    return {r.get("batch", 16): r["tokens_per_s"] for r in json.loads(Path(bench_json).read_text())["results"]
            if r["key"] == "a" and "error" not in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_dir", type=Path)
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--batch", type=int, default=16, help="the stage's training.batch_size")
    args = parser.parse_args()
    values = stage_tokens_per_s(args.metrics_dir)
    a = benchmark_a(args.bench_json)[args.batch]
    mean = statistics.fmean(values)
    print(f"train stage: {len(values)} logged windows, tokens/s mean {mean:,.0f}, median "
          f"{statistics.median(values):,.0f}, range {min(values):,.0f}-{max(values):,.0f}")
    print(f"benchmark a at batch {args.batch}: {a:,.0f} tokens/s; stage / benchmark = {mean / a:.3f} "
          f"({'within' if mean / a >= 0.95 else 'NOT within'} 5%)")


if __name__ == "__main__":
    main()
