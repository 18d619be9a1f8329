"""The evaluate stage's GPU passes, timed and profiled on the 130m shape (random init, bf16
autocast, CUDA graphs), over a WikiText-2-test-sized stream of random tokens (576 windows of
512, batch 32, as benchmarks/gpu_session.sh times the stage):

  main pass     evaluate_model with the sparsity counter (each model's first pass in the stage;
                the process's first pass also pays its one-off costs)
  prune curve   prune_curve over the stage's five non-zero fractions (five more passes)
  per batch     GPU time of one replayed batch: dense, dense + counter, pruned at 0.5; against
                the passes' wall time this says whether the stage waits on the GPU or the host
  kernels       the CUDA kernels of one eager batch: main pass and a pruned pass

  python benchmarks/evaluate_passes.py --out benchmarks/results/DATE/evaluate_passes.md --json benchmarks/results/DATE/evaluate_passes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samba import ModelConfig, Samba  # noqa: E402
from samba.cuda_graphs import GraphedCallable  # noqa: E402
from samba.data import TokenWindows  # noqa: E402
from samba.evaluate import _batch_stats, evaluate_model, prune_curve  # noqa: E402
from samba.sparsity import SparsityCounter  # noqa: E402

from report import cuda_kernels, run_meta  # noqa: E402  (benchmarks/report.py)

FRACTIONS = (0.25, 0.5, 0.6, 0.75, 0.9)  # params.yaml's eval.prune_fractions without 0
SEQ, BATCH, WINDOWS = 512, 32, 576
DTYPE = torch.bfloat16


def wall(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def replay_ms(model: Samba, counter: SparsityCounter | None, inputs, targets, repeats: int = 20) -> float:
    step = GraphedCallable(_batch_stats(model, counter, DTYPE), enabled=True, warmup=2, name="benchmark batch")
    for _ in range(3):  # two warm-ups and the capture
        step(inputs, targets)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step(inputs, targets)
    end.record()
    torch.cuda.synchronize()
    step.release()
    return start.elapsed_time(end) / repeats


def kernels(model: Samba, counter: SparsityCounter | None, inputs, targets) -> dict:
    fn = _batch_stats(model, counter, DTYPE)
    fn(inputs, targets)
    torch.cuda.synchronize()
    rows = [(k, t / 1e3, c) for k, t, c in cuda_kernels(lambda: fn(inputs, targets))]
    return {"busy_ms": sum(r[1] for r in rows), "kernels": sum(r[2] for r in rows), "top": rows[:15]}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/evaluate_passes.md")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Samba(ModelConfig()).to("cuda").eval()  # fp32 weights under bf16 autocast, as the stage loads them
    tokens = torch.randint(0, 50277, (WINDOWS * SEQ + 1,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    windows = TokenWindows(tokens, SEQ)
    cfg = model.config
    counter = lambda: SparsityCounter(cfg.n_chunks, cfg.d_model, 1e-2, 1e-2, 80, torch.device("cuda"))  # noqa: E731
    rows = {}
    for i in (1, 2):  # the first pays the process's one-off costs (cuBLAS, Triton kernels)
        rows[f"main pass {i}"], (main, _) = wall(lambda: evaluate_model(model, windows, BATCH, dtype=DTYPE, graphs=True,
                                                                       desc=None))
    rows["prune curve"], _ = wall(lambda: prune_curve(model, windows, FRACTIONS, main, BATCH, dtype=DTYPE, graphs=True,
                                                      desc=None))
    inputs, targets = next(iter(windows.batches(BATCH)))
    per_batch = {"dense": replay_ms(model, None, inputs, targets),
                 "dense + counter (main pass)": replay_ms(model, counter(), inputs, targets)}
    model.set_sparsity(0.5)
    per_batch["pruned at 0.5 (prune curve pass)"] = replay_ms(model, None, inputs, targets)
    profiles = {"pruned pass (0.5)": kernels(model, None, inputs, targets)}
    model.set_sparsity(None)
    profiles["main pass"] = kernels(model, counter(), inputs, targets)
    batches = -(-WINDOWS // BATCH)
    meta = run_meta()
    lines = [f"# The evaluate stage's passes ({meta['date']})", "", f"- machine: {meta['gpu']}, torch {meta['torch']}",
             f"- 130m shape, random init, bf16 autocast, CUDA graphs; {WINDOWS} windows of {SEQ} random tokens, batch "
             f"{BATCH}; prune fractions {FRACTIONS}; command `{meta['command']}`", "",
             "| pass | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    lines += ["", "| one batch, replayed | GPU ms | x batches per pass (s) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v * batches / 1e3:.2f} |" for k, v in per_batch.items()]
    for name, prof in profiles.items():
        lines += ["", f"## {name}, one eager batch: {prof['busy_ms']:.1f} ms of GPU work in {prof['kernels']} kernels",
                  "", "| kernel | ms | launches |", "|---|---|---|"]
        lines += [f"| `{k}` | {t:.2f} | {c} |" for k, t, c in prof["top"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "wall_s": rows, "per_batch_ms": per_batch,
                                               "profiles": profiles}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
