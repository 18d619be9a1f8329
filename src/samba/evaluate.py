"""Perplexity, accuracy and chunk-output sparsity of both heads, by one fixed protocol.

Perplexity = exp(mean next-token NLL) over consecutive non-overlapping windows of seq_len
tokens (``data.TokenWindows``): window k feeds tokens[kL : kL+L] and scores
tokens[kL+1 : kL+L+1]; a window that does not fit whole is dropped. Accuracy is the share of
those tokens whose top-1 prediction is right. Sparsity measures: ``sparsity.SparsityCounter``.

The prune curve: for each f in ``eval.prune_fractions``, ppl and readout ppl when the smallest
f of each token's chunk-output vector is zeroed at inference, the zeros flowing on. A model
trained with ``sparsity_target`` t already zeroes t, so its point at f is the one at max(f, t).
With ``eval.prune_basis: [native, pca]`` a second curve, ``prune_curve_pca``: the smallest f of
each chunk output's coordinates in that chunk's principal axes are zeroed instead, after the
model's own sparsity (``sparsity.keep_largest_in_basis``); the axes come from the evaluated
model's own chunk outputs over the first ``eval.pca_windows`` windows of the validation split.

What DVC tabulates is ``headline``'s part of the record (``metrics/eval_summary.json``); the full
record (``metrics/eval.json``) holds every chunk's measures and the curves.

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
from .sparsity import SecondMoment, SparsityCounter

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("ppl", "loss", "readout_ppl", "readout_loss", "accuracy", "readout_accuracy", "sparsity",
                "prune_curve", "prune_curve_pca")


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
            curve[f"{f:g}"] = _point(f, by_effective[effective])
    finally:
        model.set_sparsity(None)
    return curve


def prune_curve_in_basis(model: Samba, windows: TokenWindows, fractions, main: dict, batch_size: int,
                         bases, **kwargs) -> dict[str, dict[str, float]]:
    """ppl and readout ppl when the smallest fraction f of each chunk output's coordinates in that
    chunk's basis are zeroed at inference, after the model's own sparsity (f = 0: the model itself)."""
    curve = {}
    try:
        for f in fractions:
            if f == 0:
                curve["0"] = _point(0.0, main)
                continue
            model.set_prune_basis(bases, f)
            m, _ = evaluate_model(model, windows, batch_size, count_sparsity=False, **kwargs)
            curve[f"{f:g}"] = _point(f, m)
    finally:
        model.set_prune_basis(None)
    return curve


def _point(fraction: float, metrics: dict) -> dict[str, float]:
    return {"fraction": fraction, "ppl": metrics["ppl"], "readout_ppl": metrics["readout_ppl"]}


@torch.no_grad()
def pca_bases(model: Samba, windows: TokenWindows, batch_size: int, n_windows: int,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Each chunk's principal axes (``sparsity.SecondMoment``) from ``model``'s own chunk outputs,
    as they flow on, over the first ``n_windows`` of ``windows``."""
    was_training = model.training
    model.eval()
    cfg = model.config
    moment = SecondMoment(cfg.n_chunks, cfg.d_model, windows.tokens.device)
    for inputs, _ in windows.batches(batch_size, n_windows):
        with autocast(inputs.device, dtype, cache=False):
            moment.update(model.chunk_outputs(inputs))
    model.train(was_training)
    return moment.bases()


def headline(metrics: dict) -> dict:
    """What DVC tabulates (``dvc exp show``, ``dvc metrics diff``): both heads' ppl and top-1, the
    scale-free sparsity measures and the baseline's ppl; the rest stays in the full record."""
    s = metrics["sparsity"]
    last = max(s["chunk_rms"], key=int)
    return {"ppl": metrics["ppl"], "readout_ppl": metrics["readout_ppl"], "accuracy": metrics["accuracy"],
            "readout_accuracy": metrics["readout_accuracy"], "ppl_ratio": metrics["ppl_ratio"],
            "sparsity": {"l0": s["l0"], "l0_min_chunk": s["l0_min_chunk"], "near_zero_rel": s["near_zero_rel"],
                         "last_chunk_rms": s["chunk_rms"][last], "max_over_rms": max(s["max_over_rms"].values())},
            "baseline": {k: metrics["baseline"][k] for k in ("ppl", "readout_ppl", "accuracy")}}


class Protocol:
    """What every model of one evaluate run is scored with: the test windows, the validation
    windows the PCA bases come from, the eval section and the precision."""

    def __init__(self, params, data_dir):
        self.ev, self.seq_len = params.eval, params.training.seq_len
        self.device = resolve_device(params.compute)
        self.dtype = autocast_dtype(params.compute, self.device)
        self.backend = params.compute.backend
        self.options = dict(max_windows=self.ev.max_windows, dtype=self.dtype, graphs=params.compute.cuda_graphs)
        self.meta = read_meta(data_dir)
        self.windows = TokenWindows.from_numpy(load_split(data_dir, "test"), self.seq_len,
                                               self.device).require_one("test")
        self.val_windows = None
        if "pca" in self.ev.prune_basis:
            self.val_windows = TokenWindows.from_numpy(load_split(data_dir, "validation"), self.seq_len,
                                                       self.device).require_one("validation")

    def score(self, name: str, directory) -> tuple[dict, SparsityCounter]:
        """One model's metrics (and its sparsity counter): ppl, accuracy, sparsity, prune curves."""
        ev, t0 = self.ev, time.perf_counter()
        # no torch.compile here: forward passes only, whose compile time would exceed their run time
        model = Samba.from_pretrained(directory, backend=self.backend, device=self.device)
        check_vocab(self.meta, model.config.vocab_size)
        t1 = time.perf_counter()
        m, counter = evaluate_model(model, self.windows, ev.batch_size, near_zero_eps=ev.near_zero_eps,
                                    near_zero_rel=ev.near_zero_rel, histogram_bins=ev.histogram_bins,
                                    desc=f"evaluate {name}", **self.options)
        t2 = time.perf_counter()
        if "native" in ev.prune_basis:
            m["prune_curve"] = prune_curve(model, self.windows, ev.prune_fractions, m, ev.batch_size,
                                           desc=f"prune curve {name}", **self.options)
        if "pca" in ev.prune_basis:
            bases = pca_bases(model, self.val_windows, ev.batch_size, ev.pca_windows, self.dtype)
            m["prune_curve_pca"] = prune_curve_in_basis(model, self.windows, ev.prune_fractions, m, ev.batch_size,
                                                        bases, desc=f"prune curve (PCA) {name}", **self.options)
        logger.info("%s model: loaded in %.1f s, evaluated in %.1f s, prune curves in %.1f s", name, t1 - t0,
                    t2 - t1, time.perf_counter() - t2)
        m["sparsity_target"] = model.config.sparsity_target
        return m, counter

    def describe(self, trained: dict) -> dict:
        ev, device = self.ev, self.device
        return {"split": "test", "seq_len": self.seq_len, "windows": trained["windows"], "tokens": trained["tokens"],
                "near_zero_eps": ev.near_zero_eps, "near_zero_rel": ev.near_zero_rel,
                "prune_basis": list(ev.prune_basis), "pca_windows": ev.pca_windows if "pca" in ev.prune_basis else None,
                "precision": "bf16" if self.dtype is not None else "fp32",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "backend": "kernels" if kernels.use_kernels(self.backend, device.type == "cuda") else "reference",
                "cuda_graphs": graphs_wanted(self.options["graphs"], device),
                "sparsity_target": trained["sparsity_target"]}


def evaluate_pipeline(params, data_dir, baseline_dir, model_dir, out_json, plots_dir, summary_json=None) -> dict:
    """The evaluate stage: trained model and its baseline (the convert output), same protocol.

    Writes ``out_json`` (the full record), ``summary_json`` (its ``headline``, what DVC tabulates)
    and, in ``plots_dir``, the magnitude histogram, per-chunk sparsity and prune curve as JSON rows
    (for ``dvc plots``) and PNGs.
    """
    seed_everything(params.training.seed)
    require_model_dir(model_dir, "train")
    require_model_dir(baseline_dir, "convert")
    protocol = Protocol(params, data_dir)
    (trained, counter), (baseline, base_counter) = (protocol.score(name, directory) for name, directory in
                                                    (("trained", model_dir), ("baseline", baseline_dir)))
    metrics = {k: trained[k] for k in SUMMARY_KEYS if k in trained}
    metrics["baseline"] = {k: baseline[k] for k in SUMMARY_KEYS if k in baseline}
    metrics["ppl_ratio"] = trained["ppl"] / baseline["ppl"]
    metrics["protocol"] = protocol.describe(trained)
    t0 = time.perf_counter()
    centres, trained_hist = counter.histogram()
    _, baseline_hist = base_counter.histogram()
    with atomic_dir(Path(plots_dir)) as tmp:  # whole, or the earlier run's as it was
        write_magnitude_histogram(tmp, centres, trained_hist, baseline_hist)
        write_per_chunk_sparsity(tmp, trained["sparsity"], baseline["sparsity"])
        write_prune_curve(tmp, trained, baseline)
    write_json_atomic(out_json, metrics)
    if summary_json is not None:
        write_json_atomic(summary_json, headline(metrics))
    logger.info("plots and metrics written in %.1f s", time.perf_counter() - t0)
    if params.eval.max_ppl_increase > 0 and metrics["ppl_ratio"] > 1 + params.eval.max_ppl_increase:
        raise QualityError(f"test ppl {trained['ppl']:.3f} is {100 * (metrics['ppl_ratio'] - 1):.1f}% above the "
                           f"baseline's {baseline['ppl']:.3f}; eval.max_ppl_increase allows "
                           f"{100 * params.eval.max_ppl_increase:.1f}% (metrics were still written)")
    return metrics
