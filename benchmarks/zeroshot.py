"""Zero-shot results and lm-eval speed on the GPU machine.

    python benchmarks/zeroshot.py --models standin=DIR sparse=DIR [--commit HASH]
    python benchmarks/zeroshot.py --smoke --out /tmp/zs.md --json /tmp/zs.json    # CPU, tiny models

1. eval: for each model, ``python -m samba.zeroshot MODEL --tasks TASKS --include-path
   benchmarks/zeroshot_tasks --output RES/zeroshot_NAME.json`` (log beside it), then
   ``python -m samba.zeroshot compare`` of the first model against each other one.
2. speed: a dense random-init model of the 130m shape, exported with ``samba.export``. The
   requests lm-eval builds for lambada_openai (loglikelihood) and wikitext (loglikelihood_rolling)
   from the local tasks, scored by SambaLM (CUDA graphs, then eagerly) and by lm-eval's own
   transformers backend (``HFLM``: ``MambaForCausalLM`` on the export, bf16 weights, mamba-ssm's
   kernels). tokens/s = input tokens of the scored requests / wall seconds of lm-eval's call; also
   how far Samba's log-likelihoods are from HFLM's on the same weights.

The report (``--out`` markdown, ``--json``) is rewritten after each model and each speed run,
so a call cut short keeps what finished. Data: benchmarks/zeroshot_tasks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from samba import ModelConfig, Samba  # noqa: E402
from samba.export import export  # noqa: E402
from samba.zeroshot import SambaLM, compare_rows, format_compare, hub_can_serve, read_metrics  # noqa: E402

TASKS = "wikitext_local,lambada_openai_local,piqa_local,winogrande_local"
SPEED_TASKS = {"lambada_openai_local": 64, "wikitext_local": 16}  # task -> rows per batch (both backends)
NOT_RUN = {  # the Mamba paper's zero-shot tasks without an offline copy of lm-eval's data
    "hellaswag": "the validation file (rowanz/hellaswag data/hellaswag_val.jsonl, 11 MB) is not in any stored "
                 "snapshot (files of 4 MiB and more are left out), nor is llm-foundry's copy; "
                 "klosax/hellaswag_text_data's is cleaned as llama.cpp does, not as lm-eval's hellaswag reads it",
    "arc_easy, arc_challenge": "no copy of AllenAI's ARC files was found; llm-foundry's copy gives every question "
                               "4 choices, while some ARC questions have 3 or 5",
}


def versions() -> dict:
    out = {}
    for name in ("torch", "lm_eval", "datasets", "transformers", "mamba_ssm", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def meta(args) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": gpu,
            "commit": args.commit, "command": "python " + shlex.join(sys.argv), "versions": versions()}


# ----------------------------------------------------------------------------- 1. eval

def zeroshot_command(args, directory: str, output: Path) -> list[str]:
    cmd = ["python", "-m", "samba.zeroshot", directory, "--tasks", args.tasks, "--include-path", args.include_path,
           "--output", str(output), "--batch-tokens", str(args.batch_tokens),
           "--bootstrap-iters", str(args.bootstrap_iters), "--device", args.device]
    return cmd + (["--limit", str(args.limit)] if args.limit else [])


def run_eval(args, report: dict, models: list[tuple[str, str]]) -> None:
    res = Path(args.res)
    for name, directory in models:
        output = res / f"zeroshot_{name}.json"
        cmd = zeroshot_command(args, directory, output)
        t0 = time.perf_counter()
        with open(res / f"zeroshot_{name}.log", "w") as log:
            proc = subprocess.run([sys.executable, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        entry = {"model_dir": directory, "command": shlex.join(cmd), "seconds": time.perf_counter() - t0,
                 "returncode": proc.returncode}
        if proc.returncode == 0:
            data = json.loads(output.read_text())
            entry.update(metrics=read_metrics(output), sparsity_target=data["config"].get("sparsity_target"),
                         n_samples={k: v.get("effective") for k, v in data.get("n-samples", {}).items()})
        else:
            entry["error"] = (res / f"zeroshot_{name}.log").read_text().strip().splitlines()[-1:]
        report["eval"][name] = entry
        print(f"eval {name}: {entry['seconds']:.1f} s, rc {proc.returncode}", flush=True)
        write_report(args, report)
    done = [n for n, _ in models if report["eval"][n]["returncode"] == 0]
    for other in done[1:]:
        report["compare"][other] = compare_rows(report["eval"][done[0]]["metrics"], report["eval"][other]["metrics"])
    write_report(args, report)


# ----------------------------------------------------------------------------- 2. speed

def speed_model(args, work: Path, tokenizer: Path) -> tuple[Samba, Path]:
    """A dense random-init model (the 130m shape; tiny with --smoke) and its transformers export."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8, readout_stride=2) if args.smoke \
        else ModelConfig()
    model = Samba(config).eval()
    model.save_pretrained(work / "speed_samba", extra_files={"tokenizer.json": tokenizer})
    export(work / "speed_samba", work / "speed_hf")
    return model, work / "speed_hf"


def task_requests(args, manager, group: str) -> tuple[str, list]:
    """lm-eval's requests for the task of a local group (0-shot), as simple_evaluate builds them."""
    tasks = manager.load(group)["tasks"]
    (name, task), = tasks.items()
    task.set_config(key="num_fewshot", value=0)
    # 0 means every document: lm-eval slices instances[:limit], so 0 would mean none
    task.build_all_requests(limit=(args.speed_limit or args.limit) or None, rank=0, world_size=1)
    return name, list(task.instances)


def input_tokens(lm: SambaLM, requests: list) -> int:
    """Tokens the model reads for these requests (what both backends feed, after truncation)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0
    for r in requests:
        if r.request_type == "loglikelihood_rolling":
            windows = get_rolling_token_windows(lm.tok_encode(r.args[0]), lm.eot_token_id, lm.max_length, 1)
            # a window (context a, continuation b) feeds a + b[:-1]
            total += sum(len(a) + len(b) - 1 for a, b in map(make_disjoint_window, windows))
        else:
            context, continuation = r.args
            total += min(len(lm.tok_encode(context + continuation)), lm.max_length + 1) - 1
    return total


def timed_call(lm, requests) -> tuple[float, list[float]]:
    kind = requests[0].request_type
    call = lm.loglikelihood_rolling if kind == "loglikelihood_rolling" else lm.loglikelihood
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call(requests, disable_tqdm=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, [o if isinstance(o, float) else o[0] for o in out]


def run_speed(args, report: dict, tokenizer: Path) -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)  # indexing lm-eval's tasks takes seconds: once
    work = Path(tempfile.mkdtemp(prefix="zeroshot_speed_"))
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    model, hf_dir = speed_model(args, work, tokenizer)
    model.to(device)
    for group, rows in SPEED_TASKS.items():
        name, requests = task_requests(args, manager, group)
        ours = {"graphs": SambaLM(model, str(tokenizer), batch_size=rows, device=device),
                "eager": SambaLM(model, str(tokenizer), batch_size=rows, device=device, cuda_graphs=False)}
        theirs = HFLM(pretrained=str(hf_dir), backend="causal", device=device, batch_size=rows, max_length=2048,
                      dtype="bfloat16" if device == "cuda" else "float32", prefix_token_id=ours["graphs"].eot_token_id)
        entry = {"task": name, "requests": len(requests), "rows_per_batch": rows,
                 "input_tokens": input_tokens(ours["graphs"], requests), "runs": {}}
        # a warm-up call first (CUDA context, cuBLAS, Triton autotuning), every backend alike
        warm = requests[:4] if requests[0].request_type == "loglikelihood_rolling" else requests[:2 * rows]
        lls = {}
        for key, lm in (("samba", ours["graphs"]), ("samba_eager", ours["eager"]), ("hf", theirs)):
            timed_call(lm, warm)
            seconds, lls[key] = timed_call(lm, requests)
            entry["runs"][key] = {"seconds": seconds, "tokens_per_s": entry["input_tokens"] / seconds}
            print(f"speed {name} {key}: {seconds:.2f} s, {entry['input_tokens'] / seconds:,.0f} tokens/s", flush=True)
            report["speed"][name] = entry
            write_report(args, report)
        entry["samba_vs_hf"] = entry["runs"]["samba"]["tokens_per_s"] / entry["runs"]["hf"]["tokens_per_s"]
        diffs = [abs(a - b) for a, b in zip(lls["samba"], lls["hf"])]
        entry["loglikelihood_vs_hf"] = {"max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                                        "mean_abs_value": sum(map(abs, lls["hf"])) / len(diffs)}
        entry["graphs_vs_eager_max_abs_diff"] = max(abs(a - b) for a, b in zip(lls["samba"], lls["samba_eager"]))
        del theirs
        write_report(args, report)


# ----------------------------------------------------------------------------- the report

def cell(v) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def write_report(args, report: dict) -> None:
    m = report["meta"]
    lines = [f"# Zero-shot evaluation through lm-evaluation-harness ({m['date']})", "",
             f"- machine: {m['machine']}; commit {m['commit']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), f"- command: `{m['command']}`",
             "- tasks: lm-eval's own definitions on local copies of their data (benchmarks/zeroshot_tasks/, "
             "data and sources: .gpu/zeroshot/SOURCES.md); 0-shot; main head", ""]
    if report["eval"]:
        names = list(report["eval"])
        lines += ["## Results", "", "| task | metric | " + " | ".join(names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        keys = sorted({(t, k) for e in report["eval"].values() for t, ms in e.get("metrics", {}).items() for k in ms})
        for task, metric in keys:
            lines.append(f"| {task} | {metric} | " + " | ".join(
                cell(report["eval"][n].get("metrics", {}).get(task, {}).get(metric)) for n in names) + " |")
        lines += ["", "| model | directory | sparsity_target | seconds | command |", "|---|---|---|---|---|"]
        for n, e in report["eval"].items():
            status = "" if e["returncode"] == 0 else f" (failed, exit {e['returncode']}: {e.get('error')})"
            lines.append(f"| {n} | {e['model_dir']} | {e.get('sparsity_target', '-')} | {e['seconds']:.0f}{status} | "
                         f"`{e['command']}` |")
        for other, rows in report["compare"].items():
            lines += ["", f"### {other} against {names[0]}", "",
                      format_compare(rows, names[0], other).split("\n", 3)[3]]
    lines += ["", "Not run (no offline copy of the data lm-eval's task reads):", ""]
    lines += [f"- {k}: {v}" for k, v in NOT_RUN.items()]
    if report["speed"]:
        lines += ["", "## Speed: SambaLM against lm-eval's transformers backend (HFLM, MambaForCausalLM) on the same "
                      "export", "", ("Smoke test: tiny random-init model, fp32 on the CPU (no CUDA graphs)"
                                     if args.smoke else "Dense random-init model, 130m shape; bf16 (Samba: bf16 "
                                     "autocast; HFLM: bf16 weights)") + "; the same requests and rows per batch "
                      "for both; tokens = input tokens read.", "",
                  "| task | requests | tokens | rows | samba (graphs) tok/s | samba (eager) tok/s | hf tok/s | "
                  "samba / hf | max abs diff of log-likelihoods vs hf (mean abs value) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in report["speed"].values():
            r, diff = e["runs"], e.get("loglikelihood_vs_hf")
            tps = [f"{r[k]['tokens_per_s']:,.0f}" if k in r else "-" for k in ("samba", "samba_eager", "hf")]
            ratio = f"{e['samba_vs_hf']:.2f}x" if "samba_vs_hf" in e else "-"
            agree = f"{diff['max_abs_diff']:.3g} ({diff['mean_abs_value']:.3g})" if diff else "-"
            lines.append(f"| {e['task']} | {e['requests']} | {e['input_tokens']:,} | {e['rows_per_batch']} | "
                         + " | ".join(tps) + f" | {ratio} | {agree} |")
        lines += ["", "Samba's log-likelihoods with CUDA graphs against eager, largest difference: " + ", ".join(
            f"{e['task']} {e['graphs_vs_eager_max_abs_diff']:.3g}" for e in report["speed"].values()
            if "graphs_vs_eager_max_abs_diff" in e)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


# ----------------------------------------------------------------------------- main

def smoke_models(work: Path, tokenizer: Path) -> list[tuple[str, str]]:
    """Two tiny models (dense and top-k 0.5) with the real tokenizer, for the CPU smoke test."""
    models = []
    for name, target in (("tiny_dense", 0.0), ("tiny_sparse", 0.5)):
        torch.manual_seed(0)
        model = Samba(ModelConfig(d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8, readout_stride=2,
                                  sparsity_target=target))
        model.save_pretrained(work / name, extra_files={"tokenizer.json": tokenizer})
        models.append((name, str(work / name)))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR", help="the first is the baseline")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--include-path", default=str(REPO / "benchmarks/zeroshot_tasks"))
    parser.add_argument("--parts", default="eval,speed")
    parser.add_argument("--limit", type=int, default=0, help="documents per task (0: all)")
    parser.add_argument("--speed-limit", type=int, default=0, help="documents per speed task (0: --limit)")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="samba.zeroshot --batch-tokens")
    parser.add_argument("--bootstrap-iters", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", default=None, help="for the speed model (default: the first model's)")
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--res", default="benchmarks/results", help="where the per-model JSON and logs go")
    parser.add_argument("--out", default="benchmarks/results/zeroshot.md")
    parser.add_argument("--json", default="benchmarks/results/zeroshot.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, two tiny models, --limit 6 (checks the logic)")
    args = parser.parse_args()
    hub_can_serve()  # offline: set before lm-eval imports datasets, so that nothing waits on the Hub
    work = Path(tempfile.mkdtemp(prefix="zeroshot_"))
    models = [tuple(m.split("=", 1)) for m in args.models]
    if args.smoke:
        args.limit, args.device = args.limit or 6, "cpu"
        args.tokenizer = args.tokenizer or str(REPO.parent / "shared/data/tokenizers/gpt-neox-20b/tokenizer.json")
        models = models or smoke_models(work, Path(args.tokenizer))
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(models[0][1]) / "tokenizer.json" if models else None
    if "speed" in args.parts and (tokenizer is None or not tokenizer.is_file()):
        raise SystemExit(f"the speed part needs a tokenizer: --tokenizer, or a first model that records one "
                         f"({tokenizer})")
    Path(args.res).mkdir(parents=True, exist_ok=True)
    report = {"meta": meta(args), "eval": {}, "compare": {}, "speed": {}, "not_run": NOT_RUN}
    write_report(args, report)
    parts = args.parts.split(",")
    if "eval" in parts and models:
        run_eval(args, report, models)
    if "speed" in parts:
        run_speed(args, report, tokenizer)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
