"""Plot data for ``dvc plots`` (JSON rows) and the same pictures as PNG files (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .io import write_json_atomic  # noqa: E402


def write_magnitude_histogram(directory: Path, centres, trained, baseline) -> None:
    rows = [{"log10_abs": round(c, 4), "trained": t, "baseline": b}
            for c, t, b in zip(centres, trained, baseline)]
    write_json_atomic(directory / "magnitude_histogram.json", rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = centres[1] - centres[0]
    ax.bar(centres, baseline, width=width, alpha=0.5, label="baseline (init)")
    ax.bar(centres, trained, width=width, alpha=0.5, label="trained")
    ax.set_xlabel("log10 |chunk output|  (end bins hold everything beyond, zeros in the first)")
    ax.set_ylabel("fraction of elements")
    ax.set_title("Chunk-output magnitudes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "magnitude_histogram.png", dpi=120)
    plt.close(fig)


def write_per_chunk_sparsity(directory: Path, trained: dict, baseline: dict) -> None:
    chunks = sorted(trained["per_chunk"], key=int)
    keys = ("l0", "near_zero", "near_zero_rel")
    rows = [{"chunk": int(c), **{f"trained_{k}": trained["per_chunk"][c][k] for k in keys},
             **{f"baseline_{k}": baseline["per_chunk"][c][k] for k in keys}} for c in chunks]
    write_json_atomic(directory / "per_chunk_sparsity.json", rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=False)
    x = [int(c) for c in chunks]
    for ax, k in zip(axes, keys):
        ax.bar([i - 0.2 for i in x], [r[f"baseline_{k}"] for r in rows], width=0.4, label="baseline")
        ax.bar([i + 0.2 for i in x], [r[f"trained_{k}"] for r in rows], width=0.4, label="trained")
        ax.set_title(k)
        ax.set_xlabel("chunk")
        ax.set_xticks(x)
    axes[0].set_ylabel("fraction of elements")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(directory / "per_chunk_sparsity.png", dpi=120)
    plt.close(fig)


PRUNE_CURVES = {"prune_curve": "", "prune_curve_pca": "pca_"}  # curve -> the prefix of its columns


def write_prune_curve(directory: Path, trained: dict, baseline: dict) -> None:
    """ppl of both heads against the fraction zeroed at inference, trained vs baseline: one row per
    fraction, columns trained_ppl, baseline_readout_ppl, ... (trained_pca_ppl, ... for the PCA basis)."""
    curves = [(name, prefix) for name, prefix in PRUNE_CURVES.items() if name in trained]
    rows = {}
    for name, prefix in curves:
        for key, point in trained[name].items():
            row = rows.setdefault(key, {"fraction": point["fraction"]})
            for model, metrics in (("trained", trained), ("baseline", baseline)):
                row[f"{model}_{prefix}ppl"] = metrics[name][key]["ppl"]
                row[f"{model}_{prefix}readout_ppl"] = metrics[name][key]["readout_ppl"]
    rows = sorted(rows.values(), key=lambda r: r["fraction"])
    write_json_atomic(directory / "prune_curve.json", rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = [r["fraction"] for r in rows]
    for _, prefix in curves:
        for model, head, style in (("baseline", "", "o--"), ("baseline", "readout_", "s--"),
                                   ("trained", "", "o-"), ("trained", "readout_", "s-")):
            key = f"{model}_{prefix}{head}ppl"
            ax.plot(x, [r[key] for r in rows], style, alpha=1.0 if not prefix else 0.6,
                    label=f"{model} {head.rstrip('_') or 'main'}{' (PCA basis)' if prefix else ''}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of each chunk-output vector zeroed at inference (smallest)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Prune curve")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "prune_curve.png", dpi=120)
    plt.close(fig)


def plot_training_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    panels = [("loss", ["train/loss", "train/main_ce", "train/readout_ce", "val/loss"]),
              ("perplexity", ["val/ppl", "val/readout_ppl"]),
              ("sparsity (validation)", ["val/sparsity_near_zero_rel", "val/sparsity_near_zero", "val/sparsity_l0"]),
              ("pruning penalty and sparsity", ["train/penalty", "train/sparsity_fraction"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if history.get(name):
                steps, values = zip(*history[name])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
