"""Training-stage throughput (dvclive's train/tokens_per_s) next to the benchmark's step (a).

    python benchmarks/stage_throughput.py benchmarks/results/gpu_pipeline_run/metrics/train \
        benchmarks/results/train_step.json

The first logged window holds torch.compile's warm-up and is left out.
"""

import csv
import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    metrics_dir, bench_json = Path(sys.argv[1]), Path(sys.argv[2])
    with open(metrics_dir / "plots/metrics/train/tokens_per_s.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    values = [float(r["tokens_per_s"]) for r in rows][1:]
    bench = {r["key"]: r for r in json.loads(bench_json.read_text())["results"] if "error" not in r}
    a = bench["a"]["tokens_per_s"]
    mean = statistics.fmean(values)
    print(f"train stage: {len(values)} windows of logged steps, tokens/s mean {mean:,.0f}, "
          f"median {statistics.median(values):,.0f}, range {min(values):,.0f}-{max(values):,.0f}")
    print(f"benchmark a: {a:,.0f} tokens/s; stage mean / benchmark = {mean / a:.3f} "
          f"({'within' if mean / a >= 0.9 else 'NOT within'} 10%)")


if __name__ == "__main__":
    main()
