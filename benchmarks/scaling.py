"""Data-parallel scaling of the train stage itself (torchrun + DDP over NCCL, CUDA graphs).

Runs ``stages/train.py`` as ``dvc repro`` would, with the params file given, at:
  1 GPU  x batch 16   and   2 GPUs x batch 32 (16 each): the same per-GPU batch
  1 GPU  x batch 32   and   2 GPUs x batch 32 (16 each): the same global batch
and reads each run's tokens/s from its dvclive log (the mean over logged windows, the first
window, with the warm-up and capture, left out). Writes Markdown and JSON. With ``--bench-json``
(a ``train_step.py`` JSON of the same call), each one-GPU run is also set against the benchmark's
step a at its batch size (target: within 5%). On one GPU only the one-GPU runs are made.

  python benchmarks/scaling.py --params params.yaml --data data/tokenized --init models/init \
      --out benchmarks/results/DATE/scaling.md --json benchmarks/results/DATE/scaling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from stage_throughput import benchmark_a, stage_tokens_per_s  # noqa: E402  (beside this script)

REPO = Path(__file__).resolve().parents[1]
RUNS = [(1, 16), (2, 32), (1, 32)]  # (processes, global batch)


def run(params: dict, processes: int, batch: int, data: str, init: str, work: Path, steps: int,
        timeout: float) -> dict:
    p = json.loads(json.dumps(params))
    p["compute"].update(num_processes=processes, device="auto")
    p["training"].update(batch_size=batch, max_steps=steps, log_every=10, eval_every=10 * steps,
                         checkpoint_every=10 * steps, eval_batches=1)
    where = work / f"{processes}x{batch}"
    where.mkdir(parents=True)
    (where / "params.yaml").write_text(yaml.safe_dump(p))
    cmd = [sys.executable, str(REPO / "stages/train.py"), "--params", str(where / "params.yaml"), "--data", data,
           "--init", init, "--out", str(where / "out"), "--metrics", str(where / "metrics"),
           "--checkpoints", str(where / "ckpt")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung collective: kill the launcher and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return {"processes": processes, "batch": batch, "error": f"no result in {timeout:.0f} s: {stderr[-1200:]}"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"processes": processes, "batch": batch, "error": stderr[-1500:]}
    values = stage_tokens_per_s(where / "metrics")
    graphed = "captured as a CUDA graph" in stderr
    return {"processes": processes, "batch": batch, "per_gpu_batch": batch // processes,
            "tokens_per_s": statistics.fmean(values), "windows": len(values), "wall_s": wall, "cuda_graphs": graphed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/tokenized")
    parser.add_argument("--init", default="models/init")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=240, help="seconds a run may take before it counts as failed")
    parser.add_argument("--out", default="benchmarks/results/scaling.md")
    parser.add_argument("--json", default=None)
    parser.add_argument("--bench-json", default=None, help="train_step.py's JSON: the one-GPU runs against its a")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    bench = benchmark_a(args.bench_json) if args.bench_json else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, batch in RUNS:
            if processes > torch.cuda.device_count():
                rows.append({"processes": processes, "batch": batch, "error": "not enough GPUs"})
                continue
            rows.append(run(params, processes, batch, args.data, args.init, Path(tmp), args.steps, args.timeout))
            print(rows[-1], flush=True)
    by = {(r["processes"], r["batch"]): r for r in rows if "error" not in r}
    lines = [f"# Data-parallel scaling of the train stage ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
             f"- machine: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}; torch {torch.__version__}",
             f"- {args.steps} steps of `stages/train.py` per run (params {args.params}: 130m shape, seq {params['training']['seq_len']}, "
             "bf16, CUDA graphs); tokens/s = dvclive's train/tokens_per_s averaged over the logged windows after the first",
             f"- command: `python {' '.join(sys.argv)}`", "",
             "| processes | global batch | per-GPU batch | tokens/s | CUDA graphs | wall (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['processes']} | {r['batch']} | | failed: {r['error'][-300:]!r} | | |")
        else:
            lines.append(f"| {r['processes']} | {r['batch']} | {r['per_gpu_batch']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['cuda_graphs']} | {r['wall_s']:.0f} |")
    if (1, 16) in by and (2, 32) in by:
        s = by[(2, 32)]["tokens_per_s"] / by[(1, 16)]["tokens_per_s"]
        lines.append(f"\nSame per-GPU batch (16): 2 GPUs give {s:.2f}x one GPU's tokens/s, efficiency {s / 2:.3f} per GPU "
                     f"(targets: >= 1.9x, >= 0.95: {'met' if s >= 1.9 else 'missed'}).")
    if (1, 32) in by and (2, 32) in by:
        s = by[(2, 32)]["tokens_per_s"] / by[(1, 32)]["tokens_per_s"]
        lines.append(f"Same global batch (32): 2 GPUs give {s:.2f}x one GPU's tokens/s.")
    for (processes, batch), r in sorted(by.items()):
        if processes == 1 and batch in bench:
            r["x_benchmark_a"] = ratio = r["tokens_per_s"] / bench[batch]
            lines.append(f"\nThe stage on one GPU at batch {batch}: {r['tokens_per_s']:,.0f} tokens/s against the benchmark's "
                         f"a {bench[batch]:,.0f} ({args.bench_json}): {ratio:.3f}x (target: within 5%: "
                         f"{'met' if ratio >= 0.95 else 'missed'}).")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
