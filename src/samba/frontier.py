"""The sweep's answer: sparsity against perplexity, over DVC experiments, with error bars.

    python -m samba.frontier OUT_DIR [--control NAME] [--from-json exp_show.json]

Reads the experiments (``dvc exp show --json`` in the current repository, or a saved copy of
its output) and writes to OUT_DIR:

- ``frontier.md`` and ``frontier.json`` (``{"control": ..., "rows": [...]}``): one row per group
  of experiments that differ only in ``training.seed``: its experiments and seeds
  (``n_seeds``), the params that differ between groups, exact zeros (overall and in the least
  sparse chunk), near_zero_rel, test ppl (the mean over seeds) and ``ppl_std`` (their sample
  standard deviation), ppl against the control with the same schedule (``ppl_vs_control``,
  against that control's mean), against the best control of any schedule
  (``ppl_vs_best_control``) and against the untouched baseline, top-1 accuracy of both heads
  and ``readout_acc_vs_main`` (readout top-1 / main top-1), readout ppl against main, the last
  chunk's RMS and the largest max|x|/RMS over chunks; the rows on the Pareto front are marked.
- ``frontier.png``: exact zeros against ppl over the best control, with the seeds' error bars.

A control is a group with no sparsity, no penalty and no teacher (``model.sparsity_target``,
``training.pruning_weight`` and ``training.distill_weight`` all 0). A
group's control is the one whose schedule (every other param) is the same; ``--control NAME``
makes the group holding experiment NAME every group's control. The best control is the one with
the lowest mean ppl: a fine-tune that looks free against a control that overfits (one with a
larger learning rate, say) may not be against the best dense model the same data gave. The
Pareto front: no other group has at least as many exact zeros at no higher mean ppl.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from .config import flatten
from .errors import UserError
from .io import write_json_atomic


class FrontierError(UserError, ValueError):
    """The experiments cannot give a table (none has metrics, an unknown control...)."""


def runs_from_exp_show(shown: list) -> list[dict]:
    """Each experiment of ``dvc exp show --json`` that has eval metrics (not the commits it
    started from): {name, params (flat), eval (metrics/eval.json)}."""
    runs = []

    def take(rev: dict, fallback: str) -> None:
        data = rev.get("data") or {}
        metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params:
            runs.append({"name": rev.get("name") or data.get("name") or fallback, "params": flatten(params),
                         "eval": metrics})

    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            # a queued, running or failed experiment shows the commit it started from: not its own results
            if ((exp.get("executor") or {}).get("state") or "success") != "success":
                continue
            for rev in exp.get("revs") or []:
                take(rev, rev.get("rev", "?")[:7])
    return runs


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """points (zeros, ppl): on the front when no other point has >= zeros at <= ppl, one strictly."""
    return [not any(z2 >= z and p2 <= p and (z2 > z or p2 < p) for z2, p2 in points) for z, p in points]


# Where a run happened, not what it is: never a "param that differs".
NOT_EXPERIMENTAL = {"compute.device", "compute.num_processes"}
SEED = "training.seed"
# What makes a run sparse or distilled; every other param is its schedule.
TREATMENT = {"model.sparsity_target", "training.pruning_weight", "training.pruning_penalty",
             "training.sparsity_warmup_steps", "training.distill_weight", "training.teacher"}
CONTROL_ZEROS = ("model.sparsity_target", "training.pruning_weight", "training.distill_weight")


def is_control(params: dict) -> bool:
    return not any(params.get(k) for k in CONTROL_ZEROS)


def group_by_seed(runs: list[dict]) -> list[list[dict]]:
    """Runs that differ only in training.seed, together (in the order first seen)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run["params"].items() if k != SEED and k not in NOT_EXPERIMENTAL},
                         sort_keys=True)
        groups.setdefault(key, []).append(run)
    return [sorted(g, key=lambda r: r["params"].get(SEED) or 0) for g in groups.values()]  # seed 0 names it


def _start(params: dict) -> str:
    """What a run starts from and sees: its data, its initial model and the architecture. Runs
    are compared only with controls that share it (a stand-in's pretraining is no control of its
    fine-tunes)."""
    return json.dumps({k: v for k, v in params.items() if k.split(".")[0] in ("dataset", "pretrained", "model")
                       and k != "model.sparsity_target"}, sort_keys=True)


def _schedule(params: dict) -> str:
    return json.dumps({k: v for k, v in params.items() if k not in TREATMENT | NOT_EXPERIMENTAL | {SEED}},
                      sort_keys=True)


def _std(values: list[float]) -> float:
    """Sample standard deviation (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _last(per_chunk: dict | None) -> float | None:
    return per_chunk[max(per_chunk, key=int)] if per_chunk else None


def summarize(group: list[dict]) -> dict:
    """One row's measures: means over the group's seeds (ppl also with its spread)."""
    evals = [r["eval"] for r in group]

    def mean(f) -> float:
        return statistics.fmean([f(e) for e in evals])

    ppls = [e["ppl"] for e in evals]
    accuracy = mean(lambda e: e.get("accuracy", math.nan))
    readout_accuracy = mean(lambda e: e.get("readout_accuracy", math.nan))
    return {"experiment": group[0]["name"], "experiments": [r["name"] for r in group],
            "seeds": [r["params"].get(SEED) for r in group], "n_seeds": len(group),
            "exact_zeros": mean(lambda e: e["sparsity"]["l0"]),
            "exact_zeros_min_chunk": mean(lambda e: e["sparsity"].get("l0_min_chunk", e["sparsity"]["l0"])),
            "near_zero_rel": mean(lambda e: e["sparsity"]["near_zero_rel"]),
            "ppl": statistics.fmean(ppls), "ppl_std": _std(ppls), "readout_ppl": mean(lambda e: e["readout_ppl"]),
            "accuracy": accuracy, "readout_accuracy": readout_accuracy,
            "readout_acc_vs_main": readout_accuracy / accuracy if accuracy else None,
            "last_chunk_rms": mean(lambda e: _last(e["sparsity"].get("chunk_rms")) or 0.0),
            "max_over_rms": mean(lambda e: max((e["sparsity"].get("max_over_rms") or {0: 0}).values())),
            "baseline_ppl": mean(lambda e: e["baseline"]["ppl"])}


def table(runs: list[dict], control_name: str | None = None) -> tuple[list[dict], dict | None]:
    """The rows (one per seed group, by exact zeros) and the best control's row (None if none): the
    best of the controls that start from what most rows start from (``_start``)."""
    if control_name is not None and control_name not in [r["name"] for r in runs]:
        raise FrontierError(f"--control {control_name}: no experiment of that name among {[r['name'] for r in runs]}")
    keys = sorted({k for r in runs for k in r["params"]} - NOT_EXPERIMENTAL - {SEED})
    groups = group_by_seed(runs)
    differ = [k for k in keys if len({json.dumps(g[0]["params"].get(k)) for g in groups}) > 1]
    rows, schedules, starts = [], [], []
    for group in groups:
        row = summarize(group)
        row["params"] = {k: group[0]["params"].get(k) for k in differ}
        row["control"] = (control_name in row["experiments"]) if control_name else is_control(group[0]["params"])
        rows.append(row)
        schedules.append(_schedule(group[0]["params"]))
        starts.append(_start(group[0]["params"]))
    controls = [(r, s, st) for r, s, st in zip(rows, schedules, starts) if r["control"]]
    best_of = {st: min((c for c, _, s2 in controls if s2 == st), key=lambda r: r["ppl"])
               for _, _, st in controls}  # start -> its best control
    for row, schedule, start in zip(rows, schedules, starts):
        same = [c for c, s, st in controls if control_name or (s == schedule and st == start)]
        control = same[0] if same else None
        best = best_of.get(start)
        row["control_experiment"] = control["experiment"] if control else None
        row["ppl_vs_control"] = row["ppl"] / control["ppl"] - 1 if control else None
        row["best_control_experiment"] = best["experiment"] if best else None
        row["ppl_vs_best_control"] = row["ppl"] / best["ppl"] - 1 if best else None
        row["ppl_vs_baseline"] = row["ppl"] / row["baseline_ppl"] - 1
        row["readout_vs_main"] = row["readout_ppl"] / row["ppl"] - 1
    for start in set(starts):  # the front among runs that start alike
        mine = [r for r, st in zip(rows, starts) if st == start]
        for row, front in zip(mine, pareto([(r["exact_zeros"], r["ppl"]) for r in mine])):
            row["pareto"] = front
    rows.sort(key=lambda r: (r["exact_zeros"], -r["ppl"]))
    main = max(set(starts), key=starts.count)  # what most rows start from
    return rows, best_of.get(main)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def markdown(rows: list[dict], best: dict | None) -> str:
    head = (f"Best control: `{best['experiment']}` (ppl {best['ppl']:.3f} ± {best['ppl_std']:.3f}, "
            f"{best['n_seeds']} seed(s)). 'vs control' is against the control with the same schedule."
            if best else "Control: none found (no run without sparsity, penalty and teacher); ppl vs control left empty")
    lines = [head, "",
             "| experiment | seeds | params that differ | exact zeros (min chunk) | near_zero_rel | ppl ± std "
             "| vs control | vs best control | vs baseline | top-1 main / readout | readout/main top-1 "
             "| readout vs main ppl | last chunk RMS | max/RMS | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items())
        lines.append(
            f"| {r['experiment']}{' (control)' if r['control'] else ''} | {r['n_seeds']} | {params} | "
            f"{100 * r['exact_zeros']:.1f}% ({100 * r['exact_zeros_min_chunk']:.1f}%) | "
            f"{100 * r['near_zero_rel']:.2f}% | {r['ppl']:.3f} ± {r['ppl_std']:.3f} | {_pct(r['ppl_vs_control'])} | "
            f"{_pct(r['ppl_vs_best_control'])} | {_pct(r['ppl_vs_baseline'])} | "
            f"{_num(r['accuracy'], '.4f')} / {_num(r['readout_accuracy'], '.4f')} | "
            f"{_num(r['readout_acc_vs_main'], '.3f')} | {_pct(r['readout_vs_main'])} | {r['last_chunk_rms']:.3f} | "
            f"{r['max_over_rms']:.1f} | {'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], best: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "ppl_vs_best_control" if best else "ppl_vs_baseline"
    if best:  # the runs compared with that control: those that start from what it starts from
        rows = [r for r in rows if r["best_control_experiment"] == best["experiment"]]
    x = [100 * r["exact_zeros"] for r in rows]
    y = [100 * r[key] for r in rows]
    err = [100 * r["ppl_std"] / (best["ppl"] if best else r["baseline_ppl"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for xi, yi, ei, r in zip(x, y, err, rows):
        ax.errorbar(xi, yi, yerr=ei if r["n_seeds"] > 1 else None, fmt="o", capsize=3, zorder=3,
                    color="tab:red" if r["pareto"] else "tab:gray")
    front = sorted((xi, yi) for xi, yi, r in zip(x, y, rows) if r["pareto"])
    if front:
        ax.plot(*zip(*front), "-", color="tab:red", alpha=0.6, label="Pareto front")
    for xi, yi, r in zip(x, y, rows):
        label = r["experiment"] + (f" (x{r['n_seeds']})" if r["n_seeds"] > 1 else "")
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for level in (1, 3, 5, 10):
        ax.axhline(level, color="tab:blue", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], level, f" +{level}%", va="bottom", fontsize=7, color="tab:blue")
    ax.set_xlabel("exact zeros in the chunk outputs (%)")
    ax.set_ylabel(f"test ppl vs {'the best dense control' if best else 'the baseline'} (%)")
    ax.set_title("Sparsity against perplexity (error bars: std over seeds)")
    if front:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_frontier(shown: list, out_dir: Path, control_name: str | None = None) -> list[dict]:
    runs = runs_from_exp_show(shown)
    if not runs:
        raise FrontierError("no experiment has metrics/eval.json; run some first (dvc exp run)")
    rows, best = table(runs, control_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "frontier.md").write_text(markdown(rows, best))
    write_json_atomic(out_dir / "frontier.json", {"control": best["experiment"] if best else None, "rows": rows})
    plot(rows, best, out_dir / "frontier.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samba.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--control", default=None, help="the control experiment's name")
    parser.add_argument("--from-json", default=None, help="a saved `dvc exp show --json` output")
    args = parser.parse_args(argv)
    if args.from_json:
        shown = json.loads(Path(args.from_json).read_text())
    else:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FrontierError(f"dvc exp show failed: {proc.stderr.strip()[:500]}")
        shown = json.loads(proc.stdout)
    rows = write_frontier(shown, Path(args.out_dir), args.control)
    print((Path(args.out_dir) / "frontier.md").read_text())
    print(f"wrote {args.out_dir}/frontier.{{md,json,png}}: {len(rows)} experiments")


if __name__ == "__main__":
    # Run the package's copy of this module (samba.frontier), not __main__'s: the errors the
    # command line turns into one line are the package's classes.
    from samba.cli import run_stage
    from samba.frontier import main as package_main

    run_stage("frontier", package_main)
