"""Perplexity of both heads and sparsity of the chunk outputs, by one fixed protocol.

Perplexity = exp(mean next-token NLL) over consecutive non-overlapping windows of seq_len
tokens (``data.TokenWindows``): window k feeds tokens[kL : kL+L] and scores
tokens[kL+1 : kL+L+1]; a window that does not fit whole is dropped.

Sparsity of a chunk output x (B, L, d_model), counted over every element:
  l0             fraction exactly 0
  near_zero      fraction with |x| < eps
  near_zero_rel  fraction with |x| < rel * RMS of that token's d_model vector
All sums stay on the device until the end, so the loop never waits on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import require_model_dir
from .data import TokenWindows, check_vocab, load_split, read_meta
from .io import write_json_atomic
from .loss import main_head_ce, readout_head_ce
from .model import Samba
from .plots import write_magnitude_histogram, write_per_chunk_sparsity
from .runtime import autocast, autocast_dtype, resolve_device, seed_everything

class QualityError(RuntimeError):
    """The trained model lost more quality than ``eval.max_ppl_increase`` allows."""


# log10|x| histogram range; values outside (and exact zeros) land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX = -6.0, 3.0


@dataclass
class SparsityCounter:
    n_chunks: int
    eps: float
    rel: float
    bins: int
    device: torch.device

    def __post_init__(self):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)
        self.total, self.zero, self.near, self.near_rel = z(self.n_chunks), z(self.n_chunks), z(self.n_chunks), z(self.n_chunks)
        self.hist = z(self.n_chunks, self.bins)

    @torch.no_grad()
    def update(self, chunk_outputs) -> None:
        for c, x in enumerate(chunk_outputs):
            x = x.float()
            a = x.abs()
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()  # (B, L, 1)
            self.total[c] += a.numel()
            self.zero[c] += (a == 0).sum()
            self.near[c] += (a < self.eps).sum()
            self.near_rel[c] += (a < self.rel * rms).sum()
            logs = torch.log10(a).clamp(HIST_LOG10_MIN, HIST_LOG10_MAX)  # log10(0) = -inf -> first bin
            self.hist[c] += torch.histc(logs, bins=self.bins, min=HIST_LOG10_MIN, max=HIST_LOG10_MAX).double()

    def result(self) -> dict:
        total, zero, near, near_rel = (t.cpu() for t in (self.total, self.zero, self.near, self.near_rel))
        frac = lambda n, d: float(n / d) if d > 0 else float("nan")
        return {
            "l0": frac(zero.sum(), total.sum()),
            "near_zero": frac(near.sum(), total.sum()),
            "near_zero_rel": frac(near_rel.sum(), total.sum()),
            "per_chunk": {str(c): {"l0": frac(zero[c], total[c]), "near_zero": frac(near[c], total[c]),
                                   "near_zero_rel": frac(near_rel[c], total[c])}
                          for c in range(self.n_chunks)},
        }

    def histogram(self) -> tuple[list[float], list[float]]:
        """Bin centres (log10|x|) and the fraction of all chunk-output elements in each."""
        counts = self.hist.sum(0).cpu()
        width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / self.bins
        centres = [HIST_LOG10_MIN + (i + 0.5) * width for i in range(self.bins)]
        return centres, (counts / counts.sum().clamp_min(1)).tolist()


@torch.no_grad()
def evaluate_model(model: Samba, windows: TokenWindows, batch_size: int, *, max_windows: int = 0,
                   dtype: torch.dtype | None = None, near_zero_eps: float = 1e-2,
                   near_zero_rel: float = 1e-2, histogram_bins: int = 80,
                   desc: str | None = "evaluate") -> tuple[dict, SparsityCounter]:
    """Loss and ppl of both heads, and chunk-output sparsity, over ``windows``."""
    was_training = model.training
    model.eval()
    device = windows.tokens.device
    n_windows = len(windows) if max_windows <= 0 else min(len(windows), max_windows)
    if n_windows == 0:
        raise ValueError(f"no complete window of {windows.seq_len + 1} tokens in a split of "
                         f"{len(windows.tokens)} tokens")
    counter = SparsityCounter(model.config.n_chunks, near_zero_eps, near_zero_rel, histogram_bins, device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    readout_nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    batches = windows.batches(batch_size, max_windows)
    total_batches = math.ceil(n_windows / batch_size)
    for inputs, targets in tqdm(batches, total=total_batches, desc=desc, unit="batch",
                                disable=desc is None, leave=False):
        with autocast(device, dtype):
            chunk_outputs = model.chunk_outputs(inputs)
            main = main_head_ce(model, chunk_outputs, targets)
            readout = readout_head_ce(model, chunk_outputs, targets)
        n = targets.numel()
        nll += main.double() * n
        readout_nll += readout.double() * n
        tokens += n
        counter.update(chunk_outputs)
    model.train(was_training)
    loss, readout_loss = (nll / tokens).item(), (readout_nll / tokens).item()
    metrics = {"loss": loss, "ppl": math.exp(loss), "readout_loss": readout_loss,
               "readout_ppl": math.exp(readout_loss), "windows": n_windows, "tokens": tokens,
               "sparsity": counter.result()}
    return metrics, counter


def evaluate_pipeline(params, data_dir, baseline_dir, model_dir, out_json, plots_dir) -> dict:
    """The evaluate stage: trained model and its baseline (the convert output), same protocol.

    Writes ``out_json`` (metrics for ``dvc metrics``) and, in ``plots_dir``, the magnitude
    histogram and per-chunk sparsity as JSON rows (for ``dvc plots``) and PNG pictures.
    """
    ev, seq_len = params.eval, params.training.seq_len
    device = resolve_device(params.compute)
    dtype = autocast_dtype(params.compute, device)
    seed_everything(params.training.seed)
    meta = read_meta(data_dir)
    require_model_dir(model_dir, "train")
    require_model_dir(baseline_dir, "convert")
    windows = TokenWindows.from_numpy(load_split(data_dir, "test"), seq_len, device)
    results, counters = {}, {}
    for name, directory in (("trained", model_dir), ("baseline", baseline_dir)):
        model = Samba.from_pretrained(directory, backend=params.compute.backend).to(device)
        if params.compute.compile:
            model.compile_parts()
        check_vocab(meta, model.config.vocab_size)
        results[name], counters[name] = evaluate_model(
            model, windows, ev.batch_size, max_windows=ev.max_windows, dtype=dtype,
            near_zero_eps=ev.near_zero_eps, near_zero_rel=ev.near_zero_rel,
            histogram_bins=ev.histogram_bins, desc=f"evaluate {name}")
        del model
    trained, baseline = results["trained"], results["baseline"]
    metrics = {k: trained[k] for k in ("ppl", "loss", "readout_ppl", "readout_loss", "sparsity")}
    metrics["baseline"] = {k: baseline[k] for k in ("ppl", "loss", "readout_ppl", "readout_loss", "sparsity")}
    metrics["ppl_ratio"] = trained["ppl"] / baseline["ppl"]
    metrics["protocol"] = {"split": "test", "seq_len": seq_len, "windows": trained["windows"],
                           "tokens": trained["tokens"], "near_zero_eps": ev.near_zero_eps,
                           "near_zero_rel": ev.near_zero_rel}
    plots_dir = Path(plots_dir)
    centres, trained_hist = counters["trained"].histogram()
    _, baseline_hist = counters["baseline"].histogram()
    write_magnitude_histogram(plots_dir, centres, trained_hist, baseline_hist)
    write_per_chunk_sparsity(plots_dir, trained["sparsity"], baseline["sparsity"])
    write_json_atomic(out_json, metrics)
    if ev.max_ppl_increase > 0 and metrics["ppl_ratio"] > 1 + ev.max_ppl_increase:
        raise QualityError(f"test ppl {trained['ppl']:.3f} is {100 * (metrics['ppl_ratio'] - 1):.1f}% above the "
                           f"baseline's {baseline['ppl']:.3f}; eval.max_ppl_increase allows "
                           f"{100 * ev.max_ppl_increase:.1f}% (metrics were still written)")
    return metrics

