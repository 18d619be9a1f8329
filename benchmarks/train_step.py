"""One full training step (forward, loss, backward, clipping, fused AdamW), side by side.

Same GPU and shapes for all: d_model 768, 24 layers, vocab 50,280, sequences of 512 tokens,
bf16 autocast, fused AdamW; at batch 16 and at batch 32. Median of interleaved rounds.

  a           Samba's step as the train stage builds it (``train.training_objective`` and
              ``train.training_step``) with the seed's recipe: readout 0.5, L1 0.05 (params.yaml's
              default penalty is Hoyer at 0.5); compute.compile: the CE slices and readout
              compiled; compute.cuda_graphs: the whole step replayed as one CUDA graph
  a_eager     the same step launched eagerly (compute.cuda_graphs: false)
  a_topk      a with model.sparsity_target 0.75 (exact top-k zeros in every chunk output)
  a_nocompile a without torch.compile (compute.compile: false)
  a_noreadout a without the readout head (readout frozen, its CE not computed at all): Samba's
              chunks, penalty and main head alone, to tell the readout's cost from the rest. Not
              the stage at readout_weight 0, which also freezes the readout but still computes
              its CE, forward only, for the log
  a_distill   a with distillation as the stage runs it: training.distill_weight 10, the teacher
              a same-shape Samba as ``train.load_teacher`` gives it (``distill.Teacher``: fp32
              weights on the GPU, eval mode, no gradients, not compiled, run under the step's
              autocast), its forward and the sliced KL inside the captured step
  c           mamba-ssm MambaLMHeadModel + plain cross-entropy, eager (what a user would write)
  c_graphed   the same, whole step captured as a CUDA graph: the best a mamba-ssm user can do

Also: peak memory of each variant as if alone, a kernel-by-kernel profile of a_eager and c at
batch 32, and (``--ce``) the head's linear cross-entropy on its own: ours (sliced) against
liger-kernel's fused linear cross-entropy and Apple's cut-cross-entropy.
Writes Markdown and JSON (``results`` entries: key, batch, tokens_per_s, peak_gib, ...):

  python benchmarks/train_step.py --out benchmarks/results/DATE/train_step.md --json benchmarks/results/DATE/train_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samba import ModelConfig, Samba  # noqa: E402
from samba.config import TrainingConfig  # noqa: E402
from samba.cuda_graphs import GraphedCallable  # noqa: E402
from samba.distill import Teacher  # noqa: E402
from samba.loss import SambaObjective  # noqa: E402
from samba.ops import linear_cross_entropy  # noqa: E402
from samba.train import make_optimizer, training_objective, training_step  # noqa: E402

from report import cuda_kernels, run_meta  # noqa: E402  (benchmarks/report.py)

L, VOCAB, D_MODEL, N_LAYERS = 512, 50280, 768, 24
GiB = 1 << 30
DEVICE = torch.device("cuda")
# the step as measured in results/2026-11-30/train_step.md: the seed's L1 penalty (the stage's default is now Hoyer)
TRAINING = TrainingConfig(lr=1e-4, readout_weight=0.5, pruning_weight=0.05, pruning_penalty="l1", grad_clip=1.0)
DISTILL_WEIGHT = 10.0  # a_distill: the KL weight of the sparse recipe's distilled runs (top-k 0.9 + KL 10)


def samba_variant(graphs: bool, target: float = 0.0, compiled: bool = True, readout: bool = True,
                  distill: bool = False):
    def build():
        config = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, sparsity_target=target)
        model = Samba(config, backend="kernels").to(DEVICE).train()
        if compiled:
            model.compile_parts()
        training, teacher = TRAINING, None
        if distill:  # as train.load_teacher gives it: Teacher.load builds the model, fp32, on the device
            training = dataclasses.replace(TRAINING, distill_weight=DISTILL_WEIGHT)
            teacher = Teacher(Samba(dataclasses.replace(config, sparsity_target=0.0), backend="kernels").to(DEVICE))
        if readout:
            objective = training_objective(model, training, teacher)  # as the stage builds it
        else:  # no stage setting: the readout frozen as at readout_weight 0, and not reported either
            model.readout.requires_grad_(False)
            objective = SambaObjective(model, 0.0, TRAINING.pruning_weight, TRAINING.pruning_penalty,
                                       report_all=False)
        optimizer = make_optimizer(model, training, DEVICE, graphs)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = training_step(objective, optimizer, trainable, training.grad_clip, DEVICE, torch.bfloat16)
        return model, GraphedCallable(step, enabled=graphs, name="a")
    return build


def mamba_ssm_variant(graphs: bool):
    def build():
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        cfg = MambaConfig(d_model=D_MODEL, n_layer=N_LAYERS, vocab_size=50277, ssm_cfg={}, rms_norm=True,
                          residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
        model = MambaLMHeadModel(cfg, device="cuda").train()
        lr = torch.tensor(1e-4, device=DEVICE) if graphs else 1e-4
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=graphs)
        params = list(model.parameters())

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                logits = model(x).logits
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            return loss.detach()
        return model, GraphedCallable(step, enabled=graphs, name="c")
    return build


VARIANTS = {
    "a": ("Samba, the train stage's step (compiled, CUDA graph)", lambda: samba_variant(True)),
    "a_eager": ("Samba, the same step launched eagerly", lambda: samba_variant(False)),
    "a_topk": ("Samba, sparsity_target 0.75 (top-k), compiled, CUDA graph", lambda: samba_variant(True, 0.75)),
    "a_nocompile": ("Samba, compute.compile false, CUDA graph", lambda: samba_variant(True, compiled=False)),
    "a_noreadout": ("Samba without the readout head (readout_weight 0, not computed)",
                    lambda: samba_variant(True, readout=False)),
    "a_distill": (f"Samba, a with a same-shape teacher (distill_weight {DISTILL_WEIGHT:g})",
                  lambda: samba_variant(True, distill=True)),
    "c": ("mamba-ssm MambaLMHeadModel + CE, eager", lambda: mamba_ssm_variant(False)),
    "c_graphed": ("mamba-ssm MambaLMHeadModel + CE, CUDA graph", lambda: mamba_ssm_variant(True)),
}


class Runner:
    """One variant at one batch size: built, warmed up and captured, then timed in rounds."""

    def __init__(self, key: str, batch: int, warmup: int):
        self.key, self.batch, (self.name, factory) = key, batch, VARIANTS[key]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        self.model, self.step = factory()()
        g = torch.Generator(device="cuda").manual_seed(1)
        self.data = [torch.randint(0, 50277, (batch, L + 1), device="cuda", generator=g) for _ in range(4)]
        self.times: list[float] = []
        self.i = 0
        for _ in range(warmup + 2):  # eager warm-up, capture, first replays
            out = self.run_once()
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{key}: loss is {out}")
        # peak as if alone: everything this variant allocated, graph pools included
        self.peak = (torch.cuda.max_memory_allocated() - before) / GiB
        self.graphed = self.step.graph is not None

    def run_once(self):
        ids = self.data[self.i % len(self.data)]
        self.i += 1
        return self.step(ids[:, :-1], ids[:, 1:])

    def timed(self, n: int) -> None:
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.run_once()
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end))

    def result(self) -> dict:
        ms = statistics.median(self.times)
        q = statistics.quantiles(self.times, n=4)
        return {"key": self.key, "name": self.name, "batch": self.batch, "step_ms": ms, "step_ms_iqr": [q[0], q[2]],
                "tokens_per_s": self.batch * L / (ms / 1e3), "peak_gib": self.peak, "graphed": self.graphed}

    def free(self) -> None:
        self.step.release()
        del self.model, self.step, self.data
        gc.collect()
        torch.cuda.empty_cache()


def profile(runner: Runner, n: int = 3) -> dict:
    """Top CUDA kernels (ms per step) and the GPU-busy time per step."""
    rows = cuda_kernels(runner.run_once, calls=n, width=100)
    return {"kernels": [(k, t / 1e3 / n) for k, t, _ in rows[:25]], "gpu_busy_ms": sum(r[1] for r in rows) / 1e3 / n,
            "kernels_per_step": sum(r[2] for r in rows) / n}


# ----------------------------------------------------------------------------- the CE on its own

def ce_candidates():
    """name -> f(hidden, weight, targets) -> mean CE; all under bf16 autocast."""
    out = {"ours (sliced)": lambda h, w, t: linear_cross_entropy(h, w, t),
           "ours (sliced, compiled)": lambda h, w, t: linear_cross_entropy(h, w, t, compiled=True)}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger-kernel fused linear CE"] = lambda h, w, t: liger_fused_linear_cross_entropy(
            h.to(torch.bfloat16), w.to(torch.bfloat16), t)
    except Exception as err:  # noqa: BLE001
        print(f"liger-kernel unavailable: {err}")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy (exact)"] = lambda h, w, t: cce(h.to(torch.bfloat16), w.to(torch.bfloat16), t,
                                                               filter_eps=None)
        out["cut-cross-entropy (default filter)"] = lambda h, w, t: cce(h.to(torch.bfloat16), w.to(torch.bfloat16), t)
    except Exception as err:  # noqa: BLE001
        print(f"cut-cross-entropy unavailable: {err}")
    out["plain (full logits)"] = lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t)
    return out


def ce_benchmark(tokens_list=(8192, 16384), dims=(768, 512), steps: int = 10) -> list[dict]:
    results = []
    for T in tokens_list:
        for H in dims:
            g = torch.Generator(device="cuda").manual_seed(T + H)
            hidden = torch.randn(T, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            weight = (0.02 * torch.randn(VOCAB, H, device="cuda", generator=g)).requires_grad_()
            targets = torch.randint(0, VOCAB, (T,), device="cuda", generator=g)
            ref_loss = ref_grads = None
            for name, fn in ce_candidates().items():
                row = {"tokens": T, "hidden": H, "impl": name}
                try:
                    def step():
                        hidden.grad = weight.grad = None
                        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                            loss = fn(hidden, weight, targets)
                        loss.backward()
                        return loss
                    for _ in range(3):
                        loss = step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    times = []
                    for _ in range(steps):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        loss = step()
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e))
                    grads = (hidden.grad.float(), weight.grad.float())
                    if ref_loss is None:
                        ref_loss, ref_grads = loss.float(), grads
                    row.update(ms=statistics.median(times), peak_extra_gib=(torch.cuda.max_memory_allocated() - base) / GiB,
                               loss_rel_err=abs((loss.float() - ref_loss) / ref_loss).item(),
                               grad_rel_err=max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)))
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(row, flush=True)
                results.append(row)
            torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- report

def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for pkg in ("mamba_ssm", "causal_conv1d", "transformers", "triton", "liger_kernel", "cut_cross_entropy"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def report(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    lines = [f"# Training-step benchmark ({meta['date']})", "",
             f"- machine: {meta['gpu']} (driver {meta['driver']}); {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- shapes: d_model {D_MODEL}, {N_LAYERS} layers, vocab {VOCAB}, sequences of {L} tokens; bf16 autocast, "
             "fused AdamW, gradient clipping; the full step",
             f"- {meta['protocol']}", f"- command: `{meta['command']}`", ""]
    for batch in sorted({r["batch"] for r in results}):
        rows = {r["key"]: r for r in results if r["batch"] == batch and "error" not in r}
        lines += [f"## Batch {batch} x {L}", "",
                  "| | variant | step (ms) | tokens/s | x c_graphed | x c | peak (GiB) | x c peak | graphed | IQR (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        cg, c = rows.get("c_graphed"), rows.get("c")
        for r in results:
            if r["batch"] != batch:
                continue
            if "error" in r:
                lines.append(f"| {r['key']} | {r['name']} | failed: {r['error']} | | | | | | | |")
                continue
            ratio = lambda base, k="tokens_per_s": f"{r[k] / base[k]:.3f}" if base else "-"
            lines.append(f"| {r['key']} | {r['name']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio(cg)} "
                         f"| {ratio(c)} | {r['peak_gib']:.2f} | {ratio(c, 'peak_gib')} | {r['graphed']} "
                         f"| {r['step_ms_iqr'][0]:.1f}-{r['step_ms_iqr'][1]:.1f} |")
        lines += ["", "Targets:"]
        a = rows.get("a")
        if a and cg:
            t = a["tokens_per_s"] / cg["tokens_per_s"]
            lines.append(f"- a vs c_graphed tokens/s: {t:.3f}x (target >= 1.0: "
                         f"{'met' if t >= 1 else f'missed by {100 * (1 - t):.1f}%'})")
        if rows.get("a_noreadout") and cg:
            t = rows["a_noreadout"]["tokens_per_s"] / cg["tokens_per_s"]
            lines.append(f"- a_noreadout vs c_graphed tokens/s: {t:.3f}x (Samba without its readout head; "
                         f"the readout's share of a's step: {100 * (1 - a['tokens_per_s'] / rows['a_noreadout']['tokens_per_s']):.1f}%)"
                         if a else f"- a_noreadout vs c_graphed tokens/s: {t:.3f}x")
        if a and rows.get("a_topk"):
            t = rows["a_topk"]["tokens_per_s"] / a["tokens_per_s"]
            lines.append(f"- a_topk vs a tokens/s: {t:.3f}x (target >= 0.95: {'met' if t >= 0.95 else 'missed'})")
        if a and rows.get("a_distill"):
            t = rows["a_distill"]["step_ms"] / a["step_ms"]
            lines.append(f"- a_distill vs a step time: {t:.3f}x (target <= 1.35: {'met' if t <= 1.35 else 'missed'})")
        if a and c:
            m = a["peak_gib"] / c["peak_gib"]
            lines.append(f"- a vs c peak memory: {m:.3f}x (target <= 0.75: {'met' if m <= 0.75 else 'missed'})")
        lines.append("")
    for key, prof in data.get("profiles", {}).items():
        lines += [f"## Profile of {key}: top CUDA kernels (ms per step)", "",
                  f"GPU busy {prof['gpu_busy_ms']:.1f} ms per step in {prof['kernels_per_step']:.0f} kernels", "",
                  "| kernel | ms/step |", "|---|---|"]
        lines += [f"| `{n}` | {t:.2f} |" for n, t in prof["kernels"]]
        lines.append("")
    if data.get("ce"):
        lines += ["## The head's linear cross-entropy alone (forward + backward, bf16)", "",
                  "| tokens | hidden | implementation | ms | extra peak (GiB) | loss rel err | grad rel err |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["ce"]:
            if "error" in r:
                lines.append(f"| {r['tokens']} | {r['hidden']} | {r['impl']} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {r['tokens']} | {r['hidden']} | {r['impl']} | {r['ms']:.2f} | {r['peak_extra_gib']:.2f} "
                             f"| {r['loss_rel_err']:.1e} | {r['grad_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--only", default="c,c_graphed,a_eager,a,a_topk,a_nocompile,a_noreadout,a_distill",
                        help=f"comma-separated variants, of: {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-batch", type=int, default=32)
    parser.add_argument("--ce", action="store_true", help="also time the cross-entropy implementations alone")
    parser.add_argument("--out", default="benchmarks/results/train_step.md")
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="re-render a saved run; runs nothing")
    args = parser.parse_args()
    if args.from_json:
        Path(args.out).write_text(report(json.loads(Path(args.from_json).read_text())))
        return
    unknown = [k for k in args.only.split(",") if k not in VARIANTS]
    if unknown:
        parser.error(f"--only: no variant {', '.join(unknown)} (there are {', '.join(VARIANTS)})")
    torch.backends.cuda.matmul.allow_tf32 = True
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip().splitlines()[0]
    data = {"meta": {**run_meta(), "driver": driver, "versions": versions(),
                     "protocol": f"median of {args.rounds} x {args.steps} timed steps per variant, the variants of a batch "
                                 f"size timed in interleaved rounds after {args.warmup} eager warm-up steps and the capture"},
            "results": [], "profiles": {}}

    def write():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report(data))
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))

    for batch in map(int, args.batches.split(",")):
        runners = {}
        for key in args.only.split(","):
            print(f"--- batch {batch}: build, warm up, capture {key}", flush=True)
            t0 = time.perf_counter()
            try:
                runners[key] = Runner(key, batch, args.warmup)
                print(f"    ready in {time.perf_counter() - t0:.1f} s, peak {runners[key].peak:.2f} GiB, "
                      f"graphed {runners[key].graphed}", flush=True)
            except Exception as err:  # noqa: BLE001  one broken variant must not lose the others
                data["results"].append({"key": key, "name": VARIANTS[key][0], "batch": batch,
                                        "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(f"    failed: {data['results'][-1]['error']}", flush=True)
                torch.cuda.synchronize()
        for round_ in range(args.rounds):
            for runner in runners.values():
                runner.timed(args.steps)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {statistics.median(r.times[-args.steps:]):.1f} ms"
                                                      for k, r in runners.items()), flush=True)
        data["results"] += [r.result() for r in runners.values()]
        if batch == args.profile_batch:
            for key in ("a", "a_noreadout", "c_graphed"):
                if key in runners:
                    data["profiles"][f"{key} at batch {batch}"] = profile(runners[key])
        for runner in runners.values():
            runner.free()
        write()
    if args.ce:
        data["ce"] = ce_benchmark()
    write()
    print(report(data))


if __name__ == "__main__":
    main()
