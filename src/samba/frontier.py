"""The sweep's answer: sparsity against perplexity, over DVC experiments.

    python -m samba.frontier OUT_DIR [--control NAME] [--from-json exp_show.json]

Reads the experiments (``dvc exp show --json`` in the current repository, or a saved copy of
its output) and writes to OUT_DIR:

- ``frontier.md`` and ``frontier.json``: one row per experiment with an ``eval.json``: its name,
  the params that differ between the experiments, exact zeros (overall and in the least sparse
  chunk), near_zero_rel, test ppl, ppl against the control and against the untouched baseline,
  readout ppl and readout against main, the last chunk's RMS (a shrinking or growing stream)
  and the largest max|x|/RMS over chunks (outliers); the rows on the Pareto front are marked.
- ``frontier.png``: exact zeros against ppl over the control, the front joined up.

The control is the run with the same schedule and no sparsity (``--control NAME``; by default
the experiment with ``training.pruning_weight`` 0 and ``model.sparsity_target`` 0). The Pareto
front: no other run has at least as many exact zeros at no higher ppl.
"""

from __future__ import annotations

import argparse
import json
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
            for rev in exp.get("revs") or []:
                take(rev, rev.get("rev", "?")[:7])
    return runs


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """points (zeros, ppl): on the front when no other point has >= zeros at <= ppl, one strictly."""
    return [not any(z2 >= z and p2 <= p and (z2 > z or p2 < p) for z2, p2 in points) for z, p in points]


def find_control(runs: list[dict], name: str | None) -> dict | None:
    if name is not None:
        for run in runs:
            if run["name"] == name:
                return run
        raise FrontierError(f"--control {name}: no experiment of that name among {[r['name'] for r in runs]}")
    dense = [r for r in runs if r["params"].get("training.pruning_weight") == 0
             and not r["params"].get("model.sparsity_target")]
    return dense[0] if dense else None


# Where a run happened, not what it is: never a "param that differs".
NOT_EXPERIMENTAL = {"compute.device", "compute.num_processes"}


def table(runs: list[dict], control: dict | None) -> list[dict]:
    keys = sorted({k for r in runs for k in r["params"]} - NOT_EXPERIMENTAL)
    differ = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in runs}) > 1]
    rows = []
    for r in runs:
        e, s = r["eval"], r["eval"]["sparsity"]
        row = {"experiment": r["name"], "params": {k: r["params"].get(k) for k in differ},
               "exact_zeros": s["l0"], "exact_zeros_min_chunk": s.get("l0_min_chunk", s["l0"]),
               "near_zero_rel": s["near_zero_rel"], "ppl": e["ppl"], "readout_ppl": e["readout_ppl"],
               "last_chunk_rms": _last(s.get("chunk_rms")), "max_over_rms": max((s.get("max_over_rms") or {0: 0}).values()),
               "readout_vs_main": e["readout_ppl"] / e["ppl"] - 1, "baseline_ppl": e["baseline"]["ppl"],
               "ppl_vs_baseline": e["ppl"] / e["baseline"]["ppl"] - 1,
               "ppl_vs_control": e["ppl"] / control["eval"]["ppl"] - 1 if control else None,
               "control": r is control}
        rows.append(row)
    for row, front in zip(rows, pareto([(r["exact_zeros"], r["ppl"]) for r in rows])):
        row["pareto"] = front
    rows.sort(key=lambda r: (r["exact_zeros"], -r["ppl"]))
    return rows


def _last(per_chunk: dict | None) -> float | None:
    return per_chunk[max(per_chunk, key=int)] if per_chunk else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def markdown(rows: list[dict], control: dict | None) -> str:
    lines = [f"Control: `{control['name']}`" if control else "Control: none found (no run with "
             "training.pruning_weight 0 and model.sparsity_target 0); ppl vs control left empty", "",
             "| experiment | params that differ | exact zeros (min chunk) | near_zero_rel | ppl | vs control "
             "| vs baseline | readout ppl | readout vs main | last chunk RMS | max/RMS | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['experiment']}{' (control)' if r['control'] else ''} | {params} | "
                     f"{100 * r['exact_zeros']:.1f}% ({100 * r['exact_zeros_min_chunk']:.1f}%) | "
                     f"{100 * r['near_zero_rel']:.2f}% | {r['ppl']:.3f} | {_pct(r['ppl_vs_control'])} | "
                     f"{_pct(r['ppl_vs_baseline'])} | {r['readout_ppl']:.3f} | {_pct(r['readout_vs_main'])} | "
                     f"{r['last_chunk_rms'] or 0:.3f} | {r['max_over_rms']:.1f} | {'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], control: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_control = control is not None
    y = [100 * (r["ppl_vs_control"] if use_control else r["ppl_vs_baseline"]) for r in rows]
    x = [100 * r["exact_zeros"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter(x, y, c=["tab:red" if r["pareto"] else "tab:gray" for r in rows], zorder=3)
    front = sorted((xi, yi) for xi, yi, r in zip(x, y, rows) if r["pareto"])
    if front:
        ax.plot(*zip(*front), "-", color="tab:red", alpha=0.6, label="Pareto front")
    for xi, yi, r in zip(x, y, rows):
        ax.annotate(r["experiment"], (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for level in (5, 10):
        ax.axhline(level, color="tab:blue", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], level, f" +{level}%", va="bottom", fontsize=7, color="tab:blue")
    ax.set_xlabel("exact zeros in the chunk outputs (%)")
    ax.set_ylabel(f"test ppl vs {'control' if use_control else 'baseline'} (%)")
    ax.set_title("Sparsity against perplexity")
    if front:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_frontier(shown: list, out_dir: Path, control_name: str | None = None) -> list[dict]:
    runs = runs_from_exp_show(shown)
    if not runs:
        raise FrontierError("no experiment has metrics/eval.json; run some first (dvc exp run)")
    control = find_control(runs, control_name)
    rows = table(runs, control)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "frontier.md").write_text(markdown(rows, control))
    write_json_atomic(out_dir / "frontier.json", {"control": control["name"] if control else None, "rows": rows})
    plot(rows, control, out_dir / "frontier.png")
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
