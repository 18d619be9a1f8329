"""The sweep's answer: sparsity against perplexity, over DVC experiments, each sparse model set
against its dense twin and the best dense model the same data gave.

    python -m samba.frontier OUT_DIR [--all-commits] [--from-json exp_show.json ...] [--against PARAM ...]

Reads the experiments (``dvc exp show --json`` in the current repository: those of the current
commit, or of every commit with ``--all-commits``; or saved copies of its output, several joined
into one table): each one's params, its evaluation headline (``metrics/eval_summary.json``) and
its training headline (``metrics/train/summary.json``: steps and tokens seen). Writes to OUT_DIR:

- ``frontier.md`` and ``frontier.json`` (``{"best_dense": ..., "rows": [...]}``): one row per
  group of experiments that differ only in ``training.seed``, every measure the mean over the
  group's seeds (``n_seeds``; ``ppl_std`` the sample standard deviation of ppl). Two runs of one
  seed in a group are refused (they would count as two seeds); one run listed twice (the same
  rev) counts once.
- ``frontier.png``: exact zeros against ppl over each row's best dense model, with the seeds'
  error bars.
- with ``--against PARAM`` (e.g. ``training.lr``), ``frontier_vs_<name>.png``: ppl and the cost against
  the twin along that param, a line per recipe (the rows alike in every other param).

Terms:

- **dense**: ``model.sparsity_target`` 0 and ``training.pruning_weight`` 0 (a teacher allowed).
- **params that do nothing** are left out before grouping: the penalty's kind at pruning weight 0,
  the sparsity ramp of a dense run, the teacher at distillation weight 0, the validation cadence
  under ``keep: last``, and where or how a run was logged and placed (``NOT_EXPERIMENTAL``); a
  teacher's path is compared as spelled after ``os.path.normpath``.
- **twin** of a sparse group: the dense group whose params are the same but for
  ``model.sparsity_target`` 0 and no penalty: the same recipe (learning rate, teacher, KL weight,
  budget) with sparsity off. ``ppl_vs_twin`` is against the twin's mean; None (and "no twin" in
  frontier.md) when the sweep has none.
- **best dense** of a row: the dense group with the lowest mean ppl among those that start alike
  (data, initial model, architecture), are evaluated alike (``eval.max_windows``,
  ``training.seq_len``) and saw no more training tokens than the row. Claims are made against
  it, never against a weaker control.
- **Pareto front**, among rows that start and are evaluated alike: no other row has at least as
  many exact zeros at no higher mean ppl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .config import flatten
from .errors import UserError
from .io import write_json_atomic

EVAL_FILE = "metrics/eval_summary.json"
TRAIN_FILE = "metrics/train/summary.json"
SEED = "training.seed"
# Where and how a run happened, not what it is: never a "param that differs".
NOT_EXPERIMENTAL = {"compute.device", "compute.num_processes", "logging.use_wandb", "logging.project_name",
                    "training.log_every", "training.checkpoint_every"}
RAMP = ("training.sparsity_warmup_steps", "training.sparsity_warmup_fraction")
VALIDATION = ("training.eval_every", "training.eval_batches")
SPARSITY_OFF = {"model.sparsity_target": 0.0, "training.pruning_weight": 0.0}
EVAL_PROTOCOL = ("eval.max_windows", "training.seq_len")
REQUIRED = ("ppl", "readout_ppl", "baseline", "sparsity")
REQUIRED_SPARSITY = ("l0", "l0_min_chunk", "near_zero_rel")
ZEROS_RESOLUTION = 1e-3  # the Pareto front compares fractions of exact zeros to 0.1 percentage point


class FrontierError(UserError, ValueError):
    """The experiments cannot give a table (none has metrics, ...)."""


def runs_from_exp_show(shown: list) -> list[dict]:
    """Each finished experiment of ``dvc exp show --json`` that has an evaluation headline, and
    each commit the experiments start from that has one (a run committed, e.g. the CPU set-up's
    control): {name, params (flat), eval (EVAL_FILE), train (TRAIN_FILE or {})}. The workspace
    row is left out (it repeats the last run); a commit or experiment listed again (one sweep's
    clones list its base commit each, a file joined twice) counts once, by its rev."""
    runs, revs = [], set()
    for baseline in shown:
        if baseline.get("rev") != "workspace":
            _take(baseline, runs, revs)
        for exp in baseline.get("experiments") or []:
            # a queued, running or failed experiment shows the commit it started from: not its own results
            if ((exp.get("executor") or {}).get("state") or "success") != "success":
                continue
            for rev in exp.get("revs") or []:
                _take(rev, runs, revs)
    return runs


def _runs_of(shown, where: str) -> list[dict]:
    """``runs_from_exp_show``, input of another shape refused in one line that starts with ``where``."""
    try:
        return runs_from_exp_show(shown)
    except (AttributeError, TypeError):
        raise FrontierError(f"{where}not what `dvc exp show --json` writes (a list of commits, each with its "
                            "experiments)") from None


def _take(rev: dict, runs: list[dict], revs: set) -> None:
    if rev.get("rev") in revs:
        return
    if rev.get("rev"):
        revs.add(rev["rev"])
    data = rev.get("data") or {}
    metrics = data.get("metrics") or {}
    scores = (metrics.get(EVAL_FILE) or {}).get("data")
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
    if scores and params:
        runs.append({"name": rev.get("name") or data.get("name") or (rev.get("rev") or "?")[:7],
                     "params": flatten(params), "eval": scores,
                     "train": (metrics.get(TRAIN_FILE) or {}).get("data") or {}})


def effective(params: dict) -> dict:
    """``params`` without what does nothing in this run (see the module's docstring)."""
    p = {k: v for k, v in params.items() if k not in NOT_EXPERIMENTAL}
    if not p.get("training.pruning_weight"):
        p.pop("training.pruning_penalty", None)
    if not p.get("model.sparsity_target"):
        for key in RAMP:
            p.pop(key, None)
    if not p.get("training.distill_weight"):
        p.pop("training.teacher", None)
    elif isinstance(p.get("training.teacher"), str):
        p["training.teacher"] = os.path.normpath(p["training.teacher"])  # ./teachers/x is teachers/x
    if p.get("training.keep", "last") == "last":  # validation picks no weights: it only logs
        for key in VALIDATION:
            p.pop(key, None)
    return p


def is_dense(params: dict) -> bool:
    return not any(params.get(k) for k in SPARSITY_OFF)


def _norm(value):
    """A param as compared: 0 and 0.0 alike (DVC's -S writes 0, params.yaml 0.0), lists item by item."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        return value
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def _key(params: dict, leave_out=()) -> str:
    return json.dumps({k: _norm(v) for k, v in params.items() if k not in leave_out}, sort_keys=True)


def _seed(run: dict):
    """The run's training.seed; one without it trained with the config's default, 0."""
    seed = run["params"].get(SEED)
    return 0 if seed is None else seed


def group_by_seed(runs: list[dict]) -> list[list[dict]]:
    """Runs whose effective params differ only in training.seed, together, each group sorted by
    seed (the lowest names it), the groups in a fixed order (by that name)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(_key(effective(run["params"]), {SEED}), []).append(run)
    ordered = [sorted(g, key=lambda r: (_seed(r), r["name"])) for g in groups.values()]
    for group in ordered:  # a seed run twice would count as two seeds and shrink the row's spread
        seen: dict[str, dict] = {}
        for run in group:
            first = seen.setdefault(json.dumps(_norm(_seed(run))), run)
            if first is not run:  # names may repeat (one name in two joined sweeps)
                raise FrontierError(
                    f"experiments {first['name']} and {run['name']} have the same params, "
                    f"seed {_seed(run)} included "
                    "(a run repeated, or two sweeps' runs of one recipe): a row's runs must differ in "
                    "training.seed (leave one out: dvc exp remove NAME, or drop it from a saved JSON)")
    return sorted(ordered, key=lambda g: g[0]["name"])


def start_of(params: dict) -> str:
    """What a run starts from and how it is scored: its data, its initial model, the architecture
    and the evaluation windows. Rows are compared only with dense models that share it (a
    stand-in's pretraining is no reference for its fine-tunes)."""
    return _key({k: v for k, v in params.items()
                 if (k.split(".")[0] in ("dataset", "pretrained", "model") and k != "model.sparsity_target")
                 or k in EVAL_PROTOCOL})


def summarize(group: list[dict]) -> dict:
    """One row's measures, each the mean over the group's seeds (ppl also with its spread)."""
    def mean(get) -> float:
        values = [get(r) for r in group]
        return math.nan if any(v is None for v in values) else statistics.fmean(values)

    ppls = [r["eval"]["ppl"] for r in group]
    row = {"experiment": group[0]["name"], "experiments": [r["name"] for r in group],
           "seeds": [r["params"].get(SEED) for r in group], "n_seeds": len(group),
           "ppl": statistics.fmean(ppls), "ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
           "readout_ppl": mean(lambda r: r["eval"]["readout_ppl"]),
           "accuracy": mean(lambda r: r["eval"].get("accuracy")),
           "readout_accuracy": mean(lambda r: r["eval"].get("readout_accuracy")),
           "baseline_ppl": mean(lambda r: r["eval"]["baseline"]["ppl"]),
           "budget_tokens": mean(lambda r: r["train"].get("tokens"))}
    for key in ("l0", "l0_min_chunk", "near_zero_rel", "last_chunk_rms", "max_over_rms"):
        row[key] = mean(lambda r: r["eval"]["sparsity"].get(key))
    row["exact_zeros"], row["exact_zeros_min_chunk"] = row.pop("l0"), row.pop("l0_min_chunk")
    row["readout_acc_vs_main"] = row["readout_accuracy"] / row["accuracy"] if row["accuracy"] else None
    row["ppl_vs_baseline"] = row["ppl"] / row["baseline_ppl"] - 1
    row["readout_vs_main"] = row["readout_ppl"] / row["ppl"] - 1
    return row


def _within_budget(dense: dict, row: dict) -> bool:
    """Whether ``dense`` saw no more training tokens than ``row`` (unknown budgets compare)."""
    a, b = dense["budget_tokens"], row["budget_tokens"]
    return math.isnan(a) or math.isnan(b) or a <= b


def table(runs: list[dict]) -> tuple[list[dict], dict | None]:
    """The rows (one per seed group, by exact zeros, then ppl) and the headline best dense row:
    the best dense model of what most rows start from (None if that start has none)."""
    groups = group_by_seed(runs)
    params = [effective(g[0]["params"]) for g in groups]
    keys = sorted({k for p in params for k in p} - {SEED})
    # a param differs when the rows it matters to (those that keep it: ``effective``) disagree on it
    differ = [k for k in keys if len({json.dumps(_norm(p[k])) for p in params if k in p}) > 1]
    rows = []
    for group, p in zip(groups, params):
        row = summarize(group)
        row.update(params={k: p[k] for k in differ if k in p}, dense=is_dense(p), start=start_of(p))
        rows.append(row)
    dense_by_key = {_key(p, {SEED}): row for p, row in zip(params, rows) if row["dense"]}
    for p, row in zip(params, rows):
        twin = None if row["dense"] else dense_by_key.get(_key(effective({**p, **SPARSITY_OFF}), {SEED}))
        row["twin_experiment"] = twin["experiment"] if twin else None
        row["ppl_vs_twin"] = row["ppl"] / twin["ppl"] - 1 if twin else None
        best = best_dense(rows, row)
        row["best_dense_experiment"] = best["experiment"] if best else None
        row["ppl_vs_best_dense"] = row["ppl"] / best["ppl"] - 1 if best else None
    for start in sorted({r["start"] for r in rows}):
        mine = [r for r in rows if r["start"] == start]
        for row, front in zip(mine, pareto([(r["exact_zeros"], r["ppl"]) for r in mine])):
            row["pareto"] = front
    rows.sort(key=lambda r: (r["exact_zeros"], r["ppl"], r["experiment"]))
    starts = [r["start"] for r in rows]
    main = min(set(starts), key=lambda s: (-starts.count(s), s))  # the most common; ties by name
    headline = min((r for r in rows if r["start"] == main and r["dense"]), default=None,
                   key=lambda r: (r["ppl"], r["experiment"]))
    for row in rows:
        del row["start"]
    return rows, headline


def best_dense(rows: list[dict], row: dict) -> dict | None:
    """The dense row of lowest mean ppl that starts and is evaluated as ``row`` is, within its budget."""
    candidates = [r for r in rows if r["dense"] and r["start"] == row["start"] and _within_budget(r, row)]
    return min(candidates, key=lambda r: (r["ppl"], r["experiment"]), default=None)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """points (zeros, ppl): on the front when no other point has >= zeros at <= ppl, one strictly.
    Zeros count to ZEROS_RESOLUTION: a dense model's few natural exact zeros (a fraction of 1e-7
    or so) do not put it on the front beside a better dense model."""
    points = [(round(z / ZEROS_RESOLUTION), p) for z, p in points]
    return [not any(z2 >= z and p2 <= p and (z2 > z or p2 < p) for z2, p2 in points) for z, p in points]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def ppl_text(row: dict) -> str:
    """'68.960 ± 0.080 (3 seeds)', or '74.780 (1 seed)': no spread is claimed for one seed."""
    if row["n_seeds"] == 1:
        return f"{row['ppl']:.3f} (1 seed)"
    return f"{row['ppl']:.3f} ± {row['ppl_std']:.3f} ({row['n_seeds']} seeds)"


def markdown(rows: list[dict], best: dict | None) -> str:
    head = (f"Best dense model: `{best['experiment']}`, ppl {ppl_text(best)}. 'vs twin': against the same recipe "
            "with sparsity off; 'vs best dense': against the best dense model that starts and is evaluated alike "
            "and saw no more training tokens." if best else
            "Best dense model: none found (no run without sparsity and penalty); 'vs best dense' left empty.")
    lines = [head, "",
             "| experiment | params that differ | tokens (M) | exact zeros (min chunk) | near_zero_rel | ppl "
             "| vs twin | vs best dense | vs baseline | top-1 main / readout | readout/main top-1 "
             "| readout vs main ppl | last chunk RMS | max/RMS | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items())
        twin = "(dense)" if r["dense"] else (_pct(r["ppl_vs_twin"]) if r["twin_experiment"] else "no twin")
        lines.append(
            f"| {r['experiment']} | {params} | {_num(r['budget_tokens'] / 1e6, '.2f')} | "
            f"{100 * r['exact_zeros']:.1f}% ({100 * r['exact_zeros_min_chunk']:.1f}%) | "
            f"{100 * r['near_zero_rel']:.2f}% | {ppl_text(r)} | {twin} | {_pct(r['ppl_vs_best_dense'])} | "
            f"{_pct(r['ppl_vs_baseline'])} | {_num(r['accuracy'], '.4f')} / {_num(r['readout_accuracy'], '.4f')} | "
            f"{_num(r['readout_acc_vs_main'], '.3f')} | {_pct(r['readout_vs_main'])} | "
            f"{_num(r['last_chunk_rms'], '.3f')} | {_num(r['max_over_rms'], '.1f')} | {'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Exact zeros against ppl over each row's best dense model (the one it is claimed against:
    same start, no larger budget), the seeds' standard deviation as error bars; numbered points, the
    key beside the axes, so no label lands on another. Rows with no dense reference are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["experiment"]: r for r in rows}
    rows = [r for r in rows if r["best_dense_experiment"] is not None]
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [3, 2]})
    points = []
    for i, r in enumerate(rows, 1):
        reference = by_name[r["best_dense_experiment"]]["ppl"]
        x, y = 100 * r["exact_zeros"], 100 * r["ppl_vs_best_dense"]
        err = 100 * r["ppl_std"] / reference if r["n_seeds"] > 1 else None
        color = "tab:red" if r["pareto"] else ("tab:blue" if r["dense"] else "tab:gray")
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, zorder=3, color=color)
        same = sum(abs(x - x2) < 1.0 and abs(y - y2) < 0.3 for x2, y2, _ in points)  # a point drawn there already
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5 + 12 * same, 3), fontsize=8, color=color)
        points.append((x, y, r))
    front = sorted((x, y) for x, y, r in points if r["pareto"])
    if front:
        ax.plot(*zip(*front), "-", color="tab:red", alpha=0.5, label="Pareto front (red points)")
    for level in (1, 3, 6):
        ax.axhline(level, color="tab:green", linestyle=":", linewidth=1,
                   label="+1 / +3 / +6%: the targets at 75 / 90 / 95%" if level == 1 else None)
    for color, what in (("tab:blue", "dense"), ("tab:gray", "sparse")):
        ax.plot([], [], "o", color=color, label=what)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("exact zeros in the chunk outputs (%)")
    ax.set_ylabel("test ppl vs the best dense model within the run's budget (%)")
    ax.set_title("Sparsity against perplexity (error bars: std over seeds, where several)")
    key.axis("off")
    text = [f"{i:>2}  {r['experiment']}  ({r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''}; "
            f"best dense: {r['best_dense_experiment']})" for i, r in enumerate(rows, 1)]
    key.text(0, 1, "\n".join(text) or "no row has a dense model to be set against", va="top", family="monospace",
             fontsize=7, transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def series_against(rows: list[dict], key: str) -> list[dict]:
    """The rows as lines over one param (``--against``): rows alike in every other param (the seed is
    not one) make a series, its points ordered by ``key``'s value. A series of one point is left out
    (no line through it). Each: ``label`` (the params in which the drawn series differ), ``dense``,
    ``points`` [{x, ppl, ppl_std, n_seeds, ppl_vs_twin, experiment}]."""
    varying = sorted({k for r in rows for k in r["params"]})
    if key not in varying:
        raise FrontierError(f"--against {key}: not a param that differs among the rows (those that do: "
                            f"{', '.join(varying) or 'none'})")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if key not in r["params"]:
            continue
        x = r["params"][key]
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise FrontierError(f"--against {key}: {r['experiment']} has {key} = {x!r}, not a number to plot along")
        groups.setdefault(_key(r["params"], leave_out=(key,)), []).append(r)  # 0 and 0.0 alike, as in table()
    drawn = [({k: v for k, v in members[0]["params"].items() if k != key}, sorted(members, key=lambda r: r["params"][key]))
             for _, members in sorted(groups.items(), key=lambda g: _order(g[1][0]["params"], key))
             if len({_norm(r["params"][key]) for r in members}) > 1]
    if not drawn:
        raise FrontierError(f"--against {key}: no two rows differ in {key} alone (nothing to draw a line through)")
    params = sorted({k for rest, _ in drawn for k in rest})
    differ = [k for k in params if len({json.dumps(_norm(rest[k])) for rest, _ in drawn if k in rest}) > 1] \
        or params  # one line: all it is
    return [{"label": ", ".join(f"{k.split('.')[-1]}={rest[k]}" for k in differ if k in rest) or "all rows",
             "dense": members[0]["dense"],
             "points": [{"x": r["params"][key], "ppl": r["ppl"], "ppl_std": r["ppl_std"], "n_seeds": r["n_seeds"],
                         "ppl_vs_twin": r["ppl_vs_twin"], "experiment": r["experiment"]} for r in members]}
            for rest, members in drawn]


def _order(params: dict, key: str) -> list:
    """Lines in a stable, readable order: by each param's value (numbers as numbers), then by name."""
    return [(k, (0, _norm(v), "") if isinstance(_norm(v), float) else (1, 0.0, json.dumps(v)))
            for k, v in sorted(params.items()) if k != key]


def plot_against(series: list[dict], key: str, path: Path) -> None:
    """ppl (left) and the cost against the twin (right, sparse series) along one param, a line per
    series of ``series_against``; the seeds' standard deviation as error bars (0 for one seed); a log
    axis for a param whose positive values span more than a factor 3 (a learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    for i, s in enumerate(series):
        style = dict(color=f"C{i % 10}", marker="s" if s["dense"] else "o", capsize=3,
                     linestyle="--" if s["dense"] else "-", label=s["label"])
        ax.errorbar([p["x"] for p in s["points"]], [p["ppl"] for p in s["points"]],
                    yerr=[p["ppl_std"] for p in s["points"]], **style)  # summarize: ppl_std 0.0 for one seed
        twin = [(p["x"], 100 * p["ppl_vs_twin"]) for p in s["points"] if p["ppl_vs_twin"] is not None]
        if twin:  # sparse rows with a twin (a dense row has none)
            gap.plot(*zip(*twin), **{k: v for k, v in style.items() if k != "capsize"})
    xs = [p["x"] for s in series for p in s["points"]]
    for axis in (ax, gap):
        if min(xs) > 0 and max(xs) / min(xs) > 3:  # a learning rate, not a fraction
            axis.set_xscale("log")  # ticked at the measured values, plainly (a log axis's own labels overlap)
            axis.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))], rotation=30, fontsize=8)
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xlabel(key)
        axis.grid(alpha=0.3)
    ax.set_ylabel("test ppl (mean over seeds; bars: their std)")
    ax.set_title(f"Perplexity along {key} (dashed, squares: dense)")
    gap.set_ylabel("test ppl vs the dense twin (%)")
    gap.set_title("What sparsity costs against its twin (sparse rows with a twin)")
    gap.axhline(0, color="black", linewidth=0.8)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(series) / 3), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def against_path(out_dir: Path, key: str) -> Path:
    return out_dir / f"frontier_vs_{key.split('.')[-1]}.png"


def write_frontier(shown: list, out_dir: Path, against: list[str] | tuple = ()) -> list[dict]:
    """The table, its plot, and one plot along each param of ``against``: each refused before
    anything is written."""
    runs = _runs_of(shown, "the experiments are ")
    if not runs:
        raise FrontierError(f"no finished experiment has {EVAL_FILE}; run some first (dvc exp run)")
    for run in runs:
        missing = [k for k in REQUIRED if k not in run["eval"]] + [f"sparsity.{k}" for k in REQUIRED_SPARSITY
                                                                   if k not in run["eval"].get("sparsity", {})]
        if missing:
            raise FrontierError(f"experiment {run['name']}: its {EVAL_FILE} lacks {', '.join(missing)} (written by "
                                "another version of the evaluate stage?)")
        for name, value in (("ppl", run["eval"]["ppl"]), ("sparsity.l0", run["eval"]["sparsity"]["l0"])):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise FrontierError(f"experiment {run['name']}: its {EVAL_FILE} has {name} = {value!r}, not a number "
                                    "(the row's place on the front needs it)")
    rows, best = table(runs)
    lines = {key: series_against(rows, key) for key in against}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "frontier.md").write_text(markdown(rows, best))
        write_json_atomic(out_dir / "frontier.json", {"best_dense": best["experiment"] if best else None, "rows": rows})
        plot(rows, out_dir / "frontier.png")
        for key, series in lines.items():
            plot_against(series, key, against_path(out_dir, key))
    except OSError as err:
        raise FrontierError(f"{out_dir}: cannot write there ({err.strerror or err})") from None
    return rows


def read_experiments(saved: str | list[str] | None, all_commits: bool = False) -> list:
    """``dvc exp show --json`` of this repository (``-A`` with ``all_commits``), or saved copies:
    one, or several joined (sweeps run on different machines or days; their commits one list)."""
    if isinstance(saved, str):
        saved = [saved]
    if saved:
        shown, seen = [], {}
        for path in saved:
            same = seen.get(os.path.realpath(path))
            if same is not None:  # most likely a typo for another sweep's file; its runs would count once anyway
                raise FrontierError(f"--from-json {path}: given twice ({same} is the same file)")
            seen[os.path.realpath(path)] = path
            try:
                data = json.loads(Path(path).read_text())
            except OSError as err:
                raise FrontierError(f"--from-json {path}: cannot read it ({err.strerror or err})") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise FrontierError(f"--from-json {path}: not JSON ({err}); save it with dvc exp show --json") from None
            if not isinstance(data, list):
                raise FrontierError(f"--from-json {path}: not what `dvc exp show --json` writes (a list of commits)")
            if not _runs_of(data, f"--from-json {path}: "):  # each file read alone, so that a refusal names it
                joined = ", so joined it would add nothing" if len(saved) > 1 else ""
                raise FrontierError(f"--from-json {path}: no finished experiment in it has {EVAL_FILE}{joined} (a "
                                    "sweep that finished no run, or another file?)")
            shown.extend(data)
        return shown
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if all_commits else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FrontierError(f"dvc exp show failed: {proc.stderr.strip()[:500]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samba.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--from-json", action="append", default=None, metavar="FILE",
                        help="a saved `dvc exp show --json` output; repeat it to join several sweeps")
    parser.add_argument("--all-commits", action="store_true",
                        help="the experiments of every commit (dvc exp show -A), not only the current one's")
    parser.add_argument("--against", action="append", default=[], metavar="PARAM",
                        help="also plot ppl and the cost against the twin along this param (e.g. training.lr), a line "
                             "per recipe: OUT_DIR/frontier_vs_<name>.png; repeat it for several")
    args = parser.parse_args(argv)
    plots = [against_path(Path(args.out_dir), key) for key in args.against]
    if len(set(plots)) < len(plots):
        parser.error(f"--against {' '.join(args.against)}: each name once (the plots are named frontier_vs_<name>.png)")
    if args.from_json and args.all_commits:
        parser.error("--all-commits reads this repository's experiments: with --from-json it would do nothing")
    shown = read_experiments(args.from_json, args.all_commits)
    rows = write_frontier(shown, Path(args.out_dir), args.against)
    print((Path(args.out_dir) / "frontier.md").read_text())
    print(f"wrote {args.out_dir}/frontier.{{md,json,png}}: {len(rows)} rows")
    for key in args.against:
        print(f"wrote {against_path(Path(args.out_dir), key)}: {key}, a line per recipe")


if __name__ == "__main__":
    # Run the package's copy of this module (samba.frontier), not __main__'s: the errors the
    # command line turns into one line are the package's classes.
    from samba.cli import run_stage
    from samba.frontier import main as package_main

    run_stage("frontier", package_main)
