"""Cross-entropy of a linear head without materialising the (tokens x vocab) logits.

A 16 x 512 batch over a 50,280-token vocabulary has 412M logits: 1.6 GB in fp32, and the
same again for their gradient. Here the tokens are processed in slices; each slice's logits
live only long enough to give its loss and, when gradients are needed, its share of
d(hidden) and d(weight), which are computed right away (so backward costs no recompute).
On CUDA the train stage compiles each slice's softmax work (``compute.compile``, the default)
into two fused passes; the CPU runs the same code eagerly.

Why this and not a library (measured on an H200, benchmarks/results/train_step_run1.md:
8,192 tokens x 50,280, forward + backward, bf16): this, compiled, 5.3 ms (hidden 768) and
4.1 ms (512); liger-kernel's fused linear cross-entropy 13.5 / 17.2 ms; cut-cross-entropy
12.9 / 9.9 ms exact, or 6.4 / 5.1 ms with its default gradient filtering, which is an
approximation (gradient relative error 1.8e-2); full logits 8.2 ms and 4.5 GiB more. And
neither library can sit inside the captured CUDA graph of the train stage's step: liger's
forward reads the number of non-ignored targets with ``.item()``, cut-cross-entropy builds
its index of valid targets with ``nonzero()``, both host synchronisations.

On CUDA, two matrix products write fp32 straight from bf16 / fp16 operands (``out_dtype``):
each slice's d(weight) is added to the fp32 sum inside the GEMM (no bf16 product, cast and
separate add per slice), and evaluation's logits come out in fp32 for the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits of one slice: at most this many elements (128M: 512 MB in fp32).
MAX_SLICE_ELEMENTS = 1 << 27


def _slice_nll_and_grad(logits: torch.Tensor, targets: torch.Tensor, acc: torch.dtype):
    """Summed NLL of one slice and d(NLL)/d(logits) = softmax - onehot, in logits' dtype.

    Written as plain tensor code so that torch.compile can fuse it into two passes over the
    logits (one reduction, one pointwise) instead of the half-dozen eager kernels.
    """
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)  # (S,)
    nll = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = torch.exp(x - lse[:, None]) - onehot.to(acc)
    return nll, grad.to(logits.dtype)


def _slice_nll(logits: torch.Tensor, targets: torch.Tensor, acc: torch.dtype):
    """Summed NLL of one slice, the softmax in ``acc`` (one fused log-softmax + NLL kernel)."""
    return F.cross_entropy(logits.to(acc), targets, reduction="sum")


_compiled: dict[str, object] = {}
_wide_output: dict[torch.device, bool] = {}
_sums_in_place: dict[torch.device, bool] = {}


def _fp32_output(a: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether ``torch.mm`` / ``torch.addmm`` can write ``acc`` (fp32) from ``a``'s narrower dtype
    on its device: CUDA GEMMs can (``out_dtype``); probed once per device, off any capture.
    Also probes whether ``addmm`` can write that sum into its own input (``out=`` the input):
    then the fp32 d(weight) is not written anew for every slice."""
    if a.device.type != "cuda" or a.dtype not in (torch.bfloat16, torch.float16) or acc != torch.float32:
        return False
    if a.device not in _wide_output:
        x = torch.ones(2, 2, dtype=a.dtype, device=a.device)
        try:
            summed = torch.addmm(torch.ones(2, 2, device=a.device), x, x, out_dtype=torch.float32)
            product = torch.mm(x, x, out_dtype=torch.float32)
            _wide_output[a.device] = summed.dtype == product.dtype == torch.float32
        except (RuntimeError, TypeError):  # a torch without out_dtype for these
            _wide_output[a.device] = False
        try:
            total = torch.ones(2, 2, device=a.device)
            written = torch.addmm(total, x, x, out_dtype=torch.float32, out=total)
            _sums_in_place[a.device] = written.data_ptr() == total.data_ptr() and bool((total == 3).all())
        except (RuntimeError, TypeError):
            _sums_in_place[a.device] = False
    return _wide_output[a.device]


def _logits_fp32(h: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """h @ w.T in ``acc`` precision: written in fp32 by the GEMM where it can, else cast."""
    if _fp32_output(h, acc):
        return torch.mm(h, w.t(), out_dtype=acc)
    return (h @ w.t()).to(acc)


def _slice_fns(compiled: bool):
    if not compiled:
        return _slice_nll_and_grad, _slice_nll
    if not _compiled:
        _compiled["grad"] = torch.compile(_slice_nll_and_grad, dynamic=False)
        _compiled["nll"] = torch.compile(_slice_nll, dynamic=False)
    return _compiled["grad"], _compiled["nll"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, slice_tokens, compiled):
        # hidden: (T, H); weight: (V, H); targets: (T,) int64
        T = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nll_and_grad, nll_only = _slice_fns(compiled)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        wide_w = need_w and _fp32_output(h, acc)
        for start in range(0, T, slice_tokens):
            h_s, t_s = h[start:start + slice_tokens], targets[start:start + slice_tokens]
            logits = h_s @ w.t()  # (S, V), compute dtype
            if not (need_h or need_w):
                total += nll_only(logits, t_s, acc)
                continue
            nll, g = nll_and_grad(logits, t_s, acc)
            del logits
            total += nll
            if need_h:
                grad_h[start:start + slice_tokens] = g @ w
            if need_w:
                if wide_w and _sums_in_place[h.device]:  # d(weight) += g.T @ h, summed in fp32 by the GEMM
                    torch.addmm(grad_w, g.t(), h_s, out_dtype=acc, out=grad_w)
                elif wide_w:
                    grad_w = torch.addmm(grad_w, g.t(), h_s, out_dtype=acc)
                else:
                    grad_w += (g.t() @ h_s).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.T = T
        ctx.weight_dtype = weight.dtype
        return total / T

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.T
        dh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def _flatten(hidden: torch.Tensor, targets: torch.Tensor):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden vectors but {targets.shape[0]} targets")
    return hidden, targets


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


@torch.no_grad()
def linear_nll_and_correct(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           slice_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For evaluation: summed NLL (fp32) and the number of tokens whose top-1 prediction
    (argmax of hidden @ weight.T) is the target, slice by slice; nothing read on the host."""
    hidden, targets = _flatten(hidden, targets)
    compute_dtype = _compute_dtype(hidden, weight)
    acc = torch.promote_types(compute_dtype, torch.float32)
    if slice_tokens is None:
        slice_tokens = max(1, MAX_SLICE_ELEMENTS // weight.shape[0])
    w = weight.to(compute_dtype)
    nll = torch.zeros((), dtype=acc, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], slice_tokens):
            t_s = targets[start:start + slice_tokens]
            logits = _logits_fp32(hidden[start:start + slice_tokens].to(compute_dtype), w, acc)
            nll += _slice_nll(logits, t_s, acc)
            correct += (logits.argmax(dim=-1) == t_s).sum()
    return nll, correct


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         slice_tokens: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean over tokens of CE(hidden @ weight.T, targets), logits never stored in full.

    hidden: (..., H); weight: (V, H); targets: (...) with ids in [0, V). Under autocast the
    matrix products run in the autocast dtype and the softmax in fp32, as autocast would do.
    ``compiled`` fuses each slice's softmax work with torch.compile (same numbers).
    """
    hidden, targets = _flatten(hidden, targets)
    device_type = hidden.device.type
    compute_dtype = _compute_dtype(hidden, weight)
    if slice_tokens is None:
        slice_tokens = max(1, MAX_SLICE_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, slice_tokens, compiled)
