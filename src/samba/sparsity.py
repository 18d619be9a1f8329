"""Sparsity of the chunk outputs: the mechanism, the penalties and the measures, in one place.

Mechanism. ``keep_largest`` sets the ``n_zero`` smallest-magnitude entries of each token's
d_model vector to exactly 0 (top-k per token, k = d - n_zero). The count is exact whatever
the ties: entries are ranked by a stable sort of |x|, so equal magnitudes are broken by
position. ``n_zero`` may be a device tensor, so a changing fraction (the warm-up ramp, the
prune curve) needs no new shapes and no host sync, and a captured CUDA graph stays valid.
The gradient reaches the kept entries only (d/dx of x * mask is the mask).

In a basis (training-free pruning, ``eval.prune_basis: [pca]``): ``keep_largest_in_basis``
takes each vector's coordinates in an orthonormal basis V (x V), zeroes the smallest there and
rotates back (V^T). ``SecondMoment`` gives each chunk's V: the eigenvectors of the uncentred
second moment E[x x^T] of its outputs (the principal axes), so that few coordinates carry most
of the energy (LaRoSa, Liu et al., ICML 2025). The zeros are then counted in that basis.

Penalties (``training.pruning_penalty``):
  l1     mean |x| over every element: the seed's term. Every block RMS-normalises its input,
         so this is met by shrinking the whole residual stream, not by zeros.
  hoyer  per token ||x||_1 / (sqrt(d) ||x||_2), averaged over tokens and chunks: 1 for a flat
         vector, 1/sqrt(d) for a one-hot one, and unchanged when x is scaled (Hoyer 2004).

Measures (``SparsityCounter``), per chunk and overall:
  l0             fraction exactly 0
  near_zero      fraction with |x| < eps
  near_zero_rel  fraction with |x| < rel * RMS of that token's vector (scale-free)
  rms            mean over tokens of the vector's RMS (a shrinking stream shows here)
  max_over_rms   mean over tokens of max|x| / RMS (a few huge coordinates show here)
  dead_fraction  dimensions that are exactly 0 for >= 99% of tokens
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

DEAD_TOKEN_FRACTION = 0.99  # a dimension zero for at least this share of tokens is dead
# log10|x| histogram range; values outside (and exact zeros) land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX = -6.0, 3.0


# ----------------------------------------------------------------------------- mechanism

def zero_count(fraction: torch.Tensor | float, d: int) -> torch.Tensor | int:
    """How many entries of a d-vector a fraction zeroes: round(fraction * d)."""
    if isinstance(fraction, torch.Tensor):
        return (fraction * d).round().long()
    return int(round(fraction * d))


def keep_largest(x: torch.Tensor, n_zero: torch.Tensor | int) -> torch.Tensor:
    """x (..., d) with the n_zero smallest |x| of each vector set to exactly 0.

    A number n_zero takes ``topk`` of the d - n_zero largest (cheaper, for a fixed fraction);
    a device tensor ranks all d by a stable sort (shapes then do not depend on the value).
    Both keep exactly d - n_zero entries; among exactly equal magnitudes they may keep
    different ones, which changes nothing but for ties of non-zero values."""
    d = x.shape[-1]
    if not isinstance(n_zero, torch.Tensor):
        if n_zero <= 0:
            return x
        keep = x.detach().abs().topk(d - n_zero, dim=-1, sorted=False).indices
        mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, keep, True)
        return x * mask
    order = x.detach().abs().argsort(dim=-1, stable=True)  # ascending magnitude
    keep_ranked = torch.arange(d, device=x.device) >= n_zero  # (d,): rank r is kept if r >= n_zero
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, order, keep_ranked.expand(order.shape))
    return x * mask


def keep_largest_in_basis(x: torch.Tensor, n_zero: int, basis: torch.Tensor) -> torch.Tensor:
    """x (..., d) with the n_zero smallest of its coordinates in the orthonormal ``basis`` (d, d),
    columns the basis vectors, set to 0, back in the native coordinates: keep_largest(x V) V^T.
    In fp32 whatever the autocast (a bf16 rotation would blur what it keeps)."""
    if n_zero <= 0:
        return x
    with torch.autocast(x.device.type, enabled=False):
        coords = x.float() @ basis  # (..., d)
        return (keep_largest(coords, n_zero) @ basis.t()).to(x.dtype)


class SecondMoment:
    """Accumulates each chunk's uncentred second moment sum_t x_t x_t^T (fp64, on the device);
    ``bases()`` gives its eigenvectors, by decreasing eigenvalue."""

    def __init__(self, n_chunks: int, d_model: int, device: torch.device):
        self.sums = torch.zeros(n_chunks, d_model, d_model, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def update(self, chunk_outputs: Sequence[torch.Tensor]) -> None:
        for c, x in enumerate(chunk_outputs):
            x = x.double().reshape(-1, x.shape[-1])  # (T, D)
            self.sums[c] += x.t() @ x
        self.tokens += chunk_outputs[0].numel() // chunk_outputs[0].shape[-1]

    def bases(self) -> tuple[torch.Tensor, ...]:
        """One (D, D) fp32 orthonormal basis per chunk, columns ordered by decreasing eigenvalue."""
        if self.tokens == 0:
            raise ValueError("no chunk outputs were accumulated")
        _, vectors = torch.linalg.eigh(self.sums / self.tokens)  # ascending eigenvalues
        return tuple(v.flip(-1).float().contiguous() for v in vectors)


def ramp(step: int, warmup_steps: int, target: float) -> float:
    """The sparsity fraction at ``step``: 0 at step 0, linear to ``target`` at ``warmup_steps``."""
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)


# ----------------------------------------------------------------------------- penalties

def l1_penalty(chunk_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean |x| over all chunks, positions and features (chunks have equal shapes)."""
    return torch.stack([c.float().abs().mean() for c in chunk_outputs]).mean()


def hoyer_penalty(chunk_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens and chunks of ||x||_1 / (sqrt(d) ||x||_2): scale-free, in [1/sqrt(d), 1]."""
    terms = []
    for c in chunk_outputs:
        c = c.float()
        l1, l2 = c.abs().sum(-1), c.norm(dim=-1)
        terms.append((l1 / (math.sqrt(c.shape[-1]) * l2).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


PENALTIES: dict[str, Callable[[Sequence[torch.Tensor]], torch.Tensor]] = {
    "l1": l1_penalty, "hoyer": hoyer_penalty}


# ----------------------------------------------------------------------------- measures

class SparsityCounter:
    """Accumulates the measures above over batches of chunk outputs; sums stay on the device."""

    def __init__(self, n_chunks: int, d_model: int, eps: float, rel: float, bins: int,
                 device: torch.device):
        self.n_chunks, self.d_model, self.eps, self.rel, self.bins = n_chunks, d_model, eps, rel, bins
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        # per chunk: elements, tokens, zeros, near, near_rel, sum of RMS, sum of max/RMS
        self.sums = z(7, n_chunks)
        self.zero_per_dim = z(n_chunks, d_model)
        self.hist = z(n_chunks, bins)

    @torch.no_grad()
    def update(self, chunk_outputs: Sequence[torch.Tensor]) -> None:
        for c, x in enumerate(chunk_outputs):
            x = x.float().reshape(-1, x.shape[-1])  # (T, D)
            a = x.abs()
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()  # (T, 1)
            zero = a == 0
            self.sums[0, c] += a.numel()  # python numbers: no host-to-device copy
            self.sums[1, c] += a.shape[0]
            self.sums[2:, c] += torch.stack([
                zero.sum(), (a < self.eps).sum(), (a < self.rel * rms).sum(), rms.sum(),
                (a.amax(-1, keepdim=True) / rms.clamp_min(1e-30)).sum()]).double()
            self.zero_per_dim[c] += zero.sum(0)
            logs = torch.log10(a).clamp(HIST_LOG10_MIN, HIST_LOG10_MAX)  # log10(0) = -inf -> first bin
            self.hist[c] += torch.histc(logs, bins=self.bins, min=HIST_LOG10_MIN, max=HIST_LOG10_MAX).double()

    def result(self) -> dict:
        sums, zero_per_dim = self.sums.cpu(), self.zero_per_dim.cpu()
        elements, tokens, zero, near, near_rel, rms, max_over_rms = sums
        frac = lambda n, d: float(n / d) if d > 0 else float("nan")
        dead = (zero_per_dim >= DEAD_TOKEN_FRACTION * tokens[:, None]) & (tokens[:, None] > 0)  # (C, D)
        per_chunk = {str(c): {"l0": frac(zero[c], elements[c]), "near_zero": frac(near[c], elements[c]),
                              "near_zero_rel": frac(near_rel[c], elements[c]),
                              "rms": frac(rms[c], tokens[c]), "max_over_rms": frac(max_over_rms[c], tokens[c]),
                              "dead_fraction": frac(dead[c].sum(), self.d_model)}
                     for c in range(self.n_chunks)}
        return {
            "l0": frac(zero.sum(), elements.sum()),
            "l0_min_chunk": min(p["l0"] for p in per_chunk.values()),
            "near_zero": frac(near.sum(), elements.sum()),
            "near_zero_rel": frac(near_rel.sum(), elements.sum()),
            "dead_fraction": frac(dead.sum(), dead.numel()),
            "chunk_rms": {c: p["rms"] for c, p in per_chunk.items()},
            "max_over_rms": {c: p["max_over_rms"] for c, p in per_chunk.items()},
            "per_chunk": per_chunk,
        }

    def histogram(self) -> tuple[list[float], list[float]]:
        """Bin centres (log10|x|) and the fraction of all chunk-output elements in each."""
        counts = self.hist.sum(0).cpu()
        width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / self.bins
        centres = [HIST_LOG10_MIN + (i + 0.5) * width for i in range(self.bins)]
        return centres, (counts / counts.sum().clamp_min(1)).tolist()
