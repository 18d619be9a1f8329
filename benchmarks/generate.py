"""Decoding speed: Samba's recurrent generation against mamba-ssm's and transformers' generate,
on the same weights (130m shape, random init, bf16), greedy, 512 new tokens after a 16-token
prompt, at batch 1 and 64.

  samba          samba.generate.generate, main head, the decode step replayed as a CUDA graph
  samba_readout  the same from the readout head
  samba_topk     main head with model.sparsity_target 0.75 (top-k applied at every token)
  mamba_ssm      MambaLMHeadModel.generate(..., cg=True, top_k=1): mamba-ssm's own CUDA-graph
                 decoding, the model built as mamba-ssm builds it in bf16 on the GPU; the anchor
  mamba_ssm_cast the same built in fp32 and then cast whole to bf16 (this benchmark's anchor before)
  transformers   MambaForCausalLM.generate (its cache, mamba-ssm's kernels when installed)

The anchor is built as ``MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16)`` builds
it: every weight bf16 but each mixer's ``A_log`` and ``D``, which mamba-ssm keeps in fp32
(``modules/mamba_simple.py``). Cast whole to bf16 (``mamba_ssm_cast``), ``Mamba.step`` turns
A_log back to fp32 at every token (``-torch.exp(self.A_log.float())``): one copy kernel more per
layer and token, 24 per token, which made that anchor ~100 us per token slower at both batch
sizes (1,170 against 1,348 tokens/s at batch 1 on an H100). The Samba models are built the same
way (bf16, A_log and D fp32), so that both sides hold the same numbers; Samba's step does not
read A_log (A is computed once per prefill), so this changes nothing of its speed against the
model ``python -m samba.generate`` casts whole.

Median of --repeats timed runs after one warm-up run (which captures the graphs: each samba
variant keeps one ``Decoder`` across its runs, as mamba-ssm keeps its graphs); transformers,
some 30 times slower, is timed once without warm-up. Also the
share of greedy tokens on which samba and mamba_ssm agree (bf16 drifts apart late on).
``--profile``: the CUDA kernels of 64 decoding steps at batch 1, launched eagerly (the kernels a
graph replays), for samba, samba_readout and mamba_ssm: GPU time and kernel count per token.

  python benchmarks/generate.py --out benchmarks/results/DATE/generate.md --json benchmarks/results/DATE/generate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samba import ModelConfig, Samba  # noqa: E402
from samba.export import to_transformers  # noqa: E402
from samba.generate import Decoder, generate  # noqa: E402
from samba.model_files import backbone_key_map  # noqa: E402

from report import cuda_kernels, run_meta  # noqa: E402  (benchmarks/report.py)

PROMPT, NEW = 16, 512


FP32_PARAMS = ("A_log", "D")  # what mamba-ssm keeps in fp32 in a bf16 model


def build(target: float = 0.0) -> Samba:
    torch.manual_seed(0)
    model = Samba(ModelConfig(sparsity_target=target))  # the 130m shape
    return model


def in_bf16_on_gpu(model: Samba, device: str = "cuda") -> Samba:
    """``model`` as mamba-ssm builds a bf16 model: every weight bf16 on ``device`` but each
    mixer's A_log and D, kept in fp32 (the values themselves, not their bf16 roundings)."""
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in FP32_PARAMS}
    model.to(device, torch.bfloat16)
    for name, p in model.named_parameters():
        if name in kept:
            p.data = kept[name].to(device)
    return model.eval()


def mamba_ssm_model(model: Samba, cast: bool = False):
    """mamba-ssm's MambaLMHeadModel holding ``model``'s backbone weights: built in bf16 on the GPU
    (A_log and D fp32, as mamba-ssm makes them), or with ``cast`` built in fp32 on the CPU and
    cast whole to bf16 on the GPU."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={}, rms_norm=True, residual_in_fp32=True,
                      fused_add_norm=True, pad_vocab_size_multiple=8)
    theirs = MambaLMHeadModel(cfg) if cast else MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16)
    ours = model.state_dict()
    state = {src: ours[k] for k, src in backbone_key_map(model.config, "mamba_ssm").items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    theirs.load_state_dict(state, strict=True)  # copies into each parameter's own dtype and device
    if cast:
        theirs.to("cuda", torch.bfloat16)
    mixer = theirs.backbone.layers[0].mixer
    want = torch.bfloat16 if cast else torch.float32
    assert mixer.A_log.dtype == mixer.D.dtype == want and mixer.in_proj.weight.dtype == torch.bfloat16, cast
    return theirs.eval()


def timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, torch.Tensor]:
    out = fn() if warm_up else None  # warm-up: graphs captured, kernels compiled
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def decode_profile(fn, tokens: int) -> dict:
    """GPU-busy time and kernels per token of ``fn`` (eager decoding of ``tokens`` tokens), top kernels."""
    fn()  # warm-up: Triton kernels compiled
    torch.cuda.synchronize()
    rows = [(k, t / tokens, c / tokens) for k, t, c in cuda_kernels(fn)]
    return {"busy_us_per_token": sum(r[1] for r in rows), "kernels_per_token": sum(r[2] for r in rows),
            "top": rows[:15]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/generate.md")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="also profile 64 eager decoding steps at batch 1")
    args = parser.parse_args()
    ours = in_bf16_on_gpu(build())
    ours_topk = in_bf16_on_gpu(build(0.75))
    theirs = mamba_ssm_model(build())
    theirs_cast = mamba_ssm_model(build(), cast=True)
    hf = to_transformers(build()).to("cuda", torch.bfloat16).eval()
    rows = []
    for batch in map(int, args.batches.split(",")):
        prompt = torch.randint(0, 50277, (batch, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        # one decoder per model and head, kept across runs: its step is captured once, as
        # mamba-ssm's cg=True keeps its graphs on the model
        dec = {k: Decoder(m, batch, h, graphs=True) for k, (m, h) in
               {"samba": (ours, "main"), "samba_readout": (ours, "readout"), "samba_topk": (ours_topk, "main")}.items()}
        runs = {
            "samba": lambda: generate(ours, prompt, NEW, temperature=0.0, decoder=dec["samba"]),
            "samba_readout": lambda: generate(ours, prompt, NEW, head="readout", temperature=0.0,
                                              decoder=dec["samba_readout"]),
            "samba_topk": lambda: generate(ours_topk, prompt, NEW, temperature=0.0, decoder=dec["samba_topk"]),
            "mamba_ssm": lambda: theirs.generate(prompt, PROMPT + NEW, cg=True, top_k=1)[:, PROMPT:],
            "mamba_ssm_cast": lambda: theirs_cast.generate(prompt, PROMPT + NEW, cg=True, top_k=1)[:, PROMPT:],
            "transformers": lambda: hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                                pad_token_id=0)[:, PROMPT:],
        }
        outs = {}
        for name, fn in runs.items():
            try:
                slow = name == "transformers"  # ~30x slower: one run, no warm-up, is plenty
                seconds, outs[name] = timed(fn, 1 if slow else args.repeats, warm_up=not slow)
                rows.append({"key": name, "batch": batch, "seconds": seconds, "tokens_per_s": batch * NEW / seconds})
            except Exception as err:  # noqa: BLE001
                rows.append({"key": name, "batch": batch, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(rows[-1], flush=True)
        for d in dec.values():
            d.step.release()
        if "samba" in outs and "mamba_ssm" in outs:
            agree = (outs["samba"] == outs["mamba_ssm"]).float()
            first = int((agree.prod(0).cumprod(0)).sum())  # leading steps where every sequence agrees
            rows.append({"key": "agreement", "batch": batch, "token_share": agree.mean().item(), "leading_steps": first})
            print(rows[-1], flush=True)
    profiles = {}
    if args.profile:
        prompt = torch.randint(0, 50277, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        n = 64
        for name, fn in {
            "samba": lambda: generate(ours, prompt, n, temperature=0.0, graphs=False),
            "samba_readout": lambda: generate(ours, prompt, n, head="readout", temperature=0.0, graphs=False),
            "mamba_ssm": lambda: theirs.generate(prompt, PROMPT + n, cg=False, top_k=1),
            "mamba_ssm_cast": lambda: theirs_cast.generate(prompt, PROMPT + n, cg=False, top_k=1),
        }.items():
            profiles[name] = decode_profile(fn, n)
            print(name, {k: v for k, v in profiles[name].items() if k != "top"}, flush=True)
    meta = run_meta()
    lines = [f"# Decoding benchmark ({meta['date']})", "", f"- machine: {meta['gpu']}, torch {meta['torch']}",
             f"- 130m shape, random init, bf16 weights (A_log and D fp32, as mamba-ssm builds a bf16 model; "
             f"mamba_ssm_cast: all bf16), greedy; prompt {PROMPT} tokens, {NEW} new tokens; median of "
             f"{args.repeats} runs after a warm-up run; command `{meta['command']}`", "",
             "| batch | decoder | seconds | tokens/s | x mamba_ssm |", "|---|---|---|---|---|"]
    targets = []
    for batch in map(int, args.batches.split(",")):
        base = next((r for r in rows if r["batch"] == batch and r["key"] == "mamba_ssm" and "error" not in r), None)
        for r in rows:
            if r["batch"] != batch or r["key"] == "agreement":
                continue
            if "error" in r:
                lines.append(f"| {batch} | {r['key']} | failed: {r['error']} | | |")
            else:
                ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
                lines.append(f"| {batch} | {r['key']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} |")
        samba = next((r for r in rows if r["batch"] == batch and r["key"] == "samba" and "error" not in r), None)
        if samba and base:
            t = samba["tokens_per_s"] / base["tokens_per_s"]
            targets.append(f"- batch {batch}: samba vs mamba_ssm tokens/s {t:.3f}x (target >= 1.0: "
                           f"{'met' if t >= 1 else f'missed by {100 * (1 - t):.1f}%'})")
    lines += ["", "Targets:"] + targets
    for r in rows:
        if r["key"] == "agreement":
            lines.append(f"\nBatch {r['batch']}: samba and mamba_ssm greedy tokens agree on {100 * r['token_share']:.1f}% "
                         f"of positions; all sequences agree for the first {r['leading_steps']} steps.")
    for name, prof in profiles.items():
        lines += ["", f"## {name}, batch 1, eager: {prof['busy_us_per_token']:.0f} us of GPU work in "
                      f"{prof['kernels_per_token']:.0f} kernels per token (prefill included)", "",
                  "| kernel | us/token | launches/token |", "|---|---|---|"]
        lines += [f"| `{k}` | {t:.1f} | {c:.1f} |" for k, t, c in prof["top"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows, "profiles": profiles}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
