"""Perplexity, accuracy and chunk-output sparsity of both heads, by one fixed protocol.

Perplexity = exp(mean next-token NLL) over consecutive non-overlapping windows of seq_len
tokens (``data.TokenWindows``): window k feeds tokens[kL : kL+L] and scores
tokens[kL+1 : kL+L+1]; a window that does not fit whole is dropped. Accuracy is the share of
those tokens whose top-1 prediction is right. Sparsity measures: ``sparsity.SparsityCounter``.

The prune curve: for each f in ``eval.prune_fractions``, ppl and readout ppl when the smallest
f of each token's chunk-output vector is zeroed at inference, the zeros flowing on. A model
trained with ``sparsity_target`` t already zeroes t, so its point at f is the one at max(f, t).

All sums stay on the device until the end, so the loop never waits on the host; on CUDA each
batch is a replayed CUDA graph (``cuda_graphs``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cuda_graphs import GraphedCallable, graphs_wanted
from .data import TokenWindows, check_vocab, load_split, read_meta
from .errors import UserError
from .io import atomic_dir, write_json_atomic
from .model import Samba
from .model_files import require_model_dir
from .ops import kernels, linear_nll_and_correct
from .plots import write_magnitude_histogram, write_per_chunk_sparsity, write_prune_curve
from .runtime import autocast, autocast_dtype, resolve_device, seed_everything
from .sparsity import SparsityCounter

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("ppl", "loss", "readout_ppl", "readout_loss", "accuracy", "readout_accuracy", "sparsity",
                "prune_curve")


class QualityError(UserError, RuntimeError):
    """The trained model lost more quality than ``eval.max_ppl_increase`` allows."""


def _batch_stats(model: Samba, counter: SparsityCounter | None, dtype):
    """The per-batch function: NLL sums and top-1 hits of both heads, as one (4,) tensor."""
    def stats(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(inputs.device, dtype, cache=False):
            chunk_outputs = model.chunk_outputs(inputs)
            nll, hits = linear_nll_and_correct(model.final_hidden(chunk_outputs), model.lm_head_weight, targets)
            r_nll, r_hits = linear_nll_and_correct(model.readout.features(chunk_outputs),
                                                   model.readout.head.weight, targets)
        if counter is not None:
            counter.update(chunk_outputs)
        return torch.stack([nll.double(), hits.double(), r_nll.double(), r_hits.double()])
    return stats


@torch.no_grad()
def evaluate_model(model: Samba, windows: TokenWindows, batch_size: int, *, max_windows: int = 0,
                   dtype: torch.dtype | None = None, near_zero_eps: float = 1e-2,
                   near_zero_rel: float = 1e-2, histogram_bins: int = 80, graphs: bool = False,
                   count_sparsity: bool = True, desc: str | None = "evaluate") -> tuple[dict, SparsityCounter | None]:
    """Loss, ppl and accuracy of both heads (and chunk-output sparsity) over ``windows``."""
    was_training = model.training
    model.eval()
    device = windows.tokens.device
    windows.require_one("evaluated")
    n_windows = len(windows) if max_windows <= 0 else min(len(windows), max_windows)
    cfg = model.config
    counter = (SparsityCounter(cfg.n_chunks, cfg.d_model, near_zero_eps, near_zero_rel, histogram_bins, device)
               if count_sparsity else None)
    step = GraphedCallable(_batch_stats(model, counter, dtype), enabled=graphs_wanted(graphs, device),
                           warmup=2, name="evaluation batch")
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    tokens = 0
    for inputs, targets in tqdm(windows.batches(batch_size, max_windows), total=math.ceil(n_windows / batch_size),
                                desc=desc, unit="batch", disable=desc is None, leave=False):
        totals += step(inputs, targets)
        tokens += targets.numel()
    step.release()
    model.train(was_training)
    nll, hits, r_nll, r_hits = (totals / tokens).tolist()
    metrics = {"loss": nll, "ppl": math.exp(nll), "readout_loss": r_nll, "readout_ppl": math.exp(r_nll),
               "accuracy": hits, "readout_accuracy": r_hits, "windows": n_windows, "tokens": tokens}
    if counter is not None:
        metrics["sparsity"] = counter.result()
    return metrics, counter


def prune_curve(model: Samba, windows: TokenWindows, fractions, main: dict, batch_size: int,
                **kwargs) -> dict[str, dict[str, float]]:
    """ppl and readout ppl per inference-time fraction f (the model's own target is a floor)."""
    target = model.config.sparsity_target
    by_effective = {target: main}
    curve = {}
    try:
        for f in fractions:
            effective = max(f, target)
            if effective not in by_effective:
                model.set_sparsity(effective)
                by_effective[effective], _ = evaluate_model(model, windows, batch_size, count_sparsity=False,
                                                            **kwargs)
            m = by_effective[effective]
            curve[f"{f:g}"] = {"fraction": f, "ppl": m["ppl"], "readout_ppl": m["readout_ppl"]}
    finally:
        model.set_sparsity(None)
    return curve


def evaluate_pipeline(params, data_dir, baseline_dir, model_dir, out_json, plots_dir) -> dict:
    """The evaluate stage: trained model and its baseline (the convert output), same protocol.

    Writes ``out_json`` (metrics for ``dvc metrics``) and, in ``plots_dir``, the magnitude
    histogram, per-chunk sparsity and prune curve as JSON rows (for ``dvc plots``) and PNGs.
    """
    ev, seq_len = params.eval, params.training.seq_len
    device = resolve_device(params.compute)
    dtype = autocast_dtype(params.compute, device)
    seed_everything(params.training.seed)
    meta = read_meta(data_dir)
    require_model_dir(model_dir, "train")
    require_model_dir(baseline_dir, "convert")
    windows = TokenWindows.from_numpy(load_split(data_dir, "test"), seq_len, device).require_one("test")
    options = dict(max_windows=ev.max_windows, dtype=dtype, graphs=params.compute.cuda_graphs)
    results, counters = {}, {}
    for name, directory in (("trained", model_dir), ("baseline", baseline_dir)):
        t0 = time.perf_counter()
        # no torch.compile here: forward passes only, whose compile time would exceed their run time
        model = Samba.from_pretrained(directory, backend=params.compute.backend, device=device)
        check_vocab(meta, model.config.vocab_size)
        t1 = time.perf_counter()
        results[name], counters[name] = evaluate_model(
            model, windows, ev.batch_size, near_zero_eps=ev.near_zero_eps, near_zero_rel=ev.near_zero_rel,
            histogram_bins=ev.histogram_bins, desc=f"evaluate {name}", **options)
        t2 = time.perf_counter()
        results[name]["prune_curve"] = prune_curve(model, windows, ev.prune_fractions, results[name],
                                                   ev.batch_size, desc=f"prune curve {name}", **options)
        logger.info("%s model: loaded in %.1f s, evaluated in %.1f s, prune curve in %.1f s", name, t1 - t0,
                    t2 - t1, time.perf_counter() - t2)
        results[name]["sparsity_target"] = model.config.sparsity_target
        del model
    trained, baseline = results["trained"], results["baseline"]
    metrics = {k: trained[k] for k in SUMMARY_KEYS}
    metrics["baseline"] = {k: baseline[k] for k in SUMMARY_KEYS}
    metrics["ppl_ratio"] = trained["ppl"] / baseline["ppl"]
    metrics["protocol"] = {
        "split": "test", "seq_len": seq_len, "windows": trained["windows"], "tokens": trained["tokens"],
        "near_zero_eps": ev.near_zero_eps, "near_zero_rel": ev.near_zero_rel,
        "precision": "bf16" if dtype is not None else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": "kernels" if kernels.use_kernels(params.compute.backend, device.type == "cuda") else "reference",
        "cuda_graphs": graphs_wanted(params.compute.cuda_graphs, device),
        "sparsity_target": trained["sparsity_target"]}
    plots_dir, t0 = Path(plots_dir), time.perf_counter()
    centres, trained_hist = counters["trained"].histogram()
    _, baseline_hist = counters["baseline"].histogram()
    with atomic_dir(plots_dir) as tmp:  # whole, or the earlier run's as it was
        write_magnitude_histogram(tmp, centres, trained_hist, baseline_hist)
        write_per_chunk_sparsity(tmp, trained["sparsity"], baseline["sparsity"])
        write_prune_curve(tmp, trained["prune_curve"], baseline["prune_curve"])
    write_json_atomic(out_json, metrics)
    logger.info("plots and metrics written in %.1f s", time.perf_counter() - t0)
    if ev.max_ppl_increase > 0 and metrics["ppl_ratio"] > 1 + ev.max_ppl_increase:
        raise QualityError(f"test ppl {trained['ppl']:.3f} is {100 * (metrics['ppl_ratio'] - 1):.1f}% above the "
                           f"baseline's {baseline['ppl']:.3f}; eval.max_ppl_increase allows "
                           f"{100 * ev.max_ppl_increase:.1f}% (metrics were still written)")
    return metrics
