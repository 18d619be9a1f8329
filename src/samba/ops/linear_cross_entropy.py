"""Cross-entropy of a linear head without materialising the (tokens x vocab) logits.

A 16 x 512 batch over a 50,280-token vocabulary has 412M logits: 1.6 GB in fp32, and the
same again for their gradient. Here the tokens are processed in slices; each slice's logits
live only long enough to give its loss and, when autograd will use them, its share of
d(hidden) and d(weight), which are computed right away (so backward costs no recompute).
On CUDA the train stage compiles each slice's softmax work (``compute.compile``, the default)
into two fused passes; the CPU runs the same code eagerly.

Why this and not a library (measured on an H200, benchmarks/results/2026-11-28/train_step.md:
8,192 tokens x 50,280, forward + backward, bf16): this, compiled, 5.3 ms (hidden 768) and
4.1 ms (512); liger-kernel's fused linear cross-entropy 13.5 / 17.2 ms; cut-cross-entropy
12.9 / 9.9 ms exact, or 6.4 / 5.1 ms with its default gradient filtering, which is an
approximation (gradient relative error 1.8e-2); full logits 8.2 ms and 4.5 GiB more. And
neither library can sit inside the captured CUDA graph of the train stage's step: liger's
forward reads the number of non-ignored targets with ``.item()``, cut-cross-entropy builds
its index of valid targets with ``nonzero()``, both host synchronisations.

For evaluation the same slices give the summed NLL and top-1 hits (``linear_nll_and_correct``)
and, for lm-eval's scoring, each token's log-probability (``linear_token_logprobs``).

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


def _slice_kl_and_grad(logits: torch.Tensor, teacher_logits: torch.Tensor, acc: torch.dtype):
    """Summed KL(teacher || student) over one slice's tokens, in nats, and its gradient with
    respect to the student's logits, softmax(student) - softmax(teacher), in logits' dtype.
    Plain tensor code, for torch.compile to fuse as it does the cross-entropy's."""
    s, t = logits.to(acc), teacher_logits.to(acc)
    log_ps = s - torch.logsumexp(s, dim=-1, keepdim=True)
    log_pt = t - torch.logsumexp(t, dim=-1, keepdim=True)
    pt = torch.exp(log_pt)
    kl = (pt * (log_pt - log_ps)).sum()
    return kl, (torch.exp(log_ps) - pt).to(logits.dtype)


def _slice_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, acc: torch.dtype):
    """Summed KL(teacher || student) of one slice, without its gradient."""
    return F.kl_div(F.log_softmax(logits.to(acc), dim=-1), F.log_softmax(teacher_logits.to(acc), dim=-1),
                    reduction="sum", log_target=True)


def _slice_logprobs(logits: torch.Tensor, targets: torch.Tensor, acc: torch.dtype):
    """log P(target) of each of one slice's tokens (S,) from its logits (already ``acc``), and
    whether each target is the top-1 prediction (S,)."""
    logprobs = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return logprobs, logits.argmax(dim=-1) == targets


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


def _slice_fns(compiled: bool, kind: str = "nll"):
    """The per-slice (loss and gradient, loss only) pair of ``kind`` (nll or kl), compiled or not."""
    fns = {"nll": (_slice_nll_and_grad, _slice_nll), "kl": (_slice_kl_and_grad, _slice_kl)}[kind]
    if not compiled:
        return fns
    if kind not in _compiled:
        _compiled[kind] = tuple(torch.compile(f, dynamic=False) for f in fns)
    return _compiled[kind]


class _SliceGrads:
    """d(hidden) and d(weight) of a sliced head loss, filled slice by slice from each slice's
    d(loss)/d(logits) as soon as it is known (so backward costs no recompute)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, acc: torch.dtype,
                 need_h: bool, need_w: bool):
        self.h = torch.empty_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.acc = acc
        self.wide_w = need_w and _fp32_output(h, acc)
        self.in_place = self.wide_w and _sums_in_place[h.device]

    @property
    def needed(self) -> bool:
        return self.h is not None or self.w is not None

    def add(self, g: torch.Tensor, w: torch.Tensor, h_s: torch.Tensor, start: int) -> None:
        """g: (S, V) d(loss)/d(logits) of the slice starting at token ``start``; h_s: its (S, H) inputs."""
        if self.h is not None:
            self.h[start:start + g.shape[0]] = g @ w
        if self.w is not None:
            if self.in_place:  # d(weight) += g.T @ h, summed in fp32 by the GEMM
                torch.addmm(self.w, g.t(), h_s, out_dtype=self.acc, out=self.w)
            elif self.wide_w:
                self.w = torch.addmm(self.w, g.t(), h_s, out_dtype=self.acc)
            else:
                self.w += (g.t() @ h_s).to(self.acc)


def _scaled_grads(ctx, grad_out):
    """Backward of a sliced head loss: the saved d(hidden), d(weight) of the summed loss, scaled
    to the mean's and the incoming gradient."""
    grad_h, grad_w = ctx.saved_tensors
    scale = grad_out / ctx.T
    dh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
    dw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
    return dh, dw


def _sliced_forward(ctx, hidden, weight, compute_dtype, slice_tokens, fns, operand, fp32_logits=False):
    """The loop every sliced head op shares. hidden: (T, H); weight: (V, H); ``fns``: the per-slice
    (value and d(logits), value only) pair; ``operand(start, stop)``: the slice's other operand (its
    targets, or the teacher's logits). Returns each slice's value, in order. With an autograd
    ``ctx`` whose inputs need them, d(hidden) and d(weight) of the values' sum are made slice by
    slice and saved on it; ``fp32_logits``: the GEMM writes the logits in fp32 (for scoring), else
    they are in compute_dtype (the losses', whose slice functions cast them)."""
    with_grad, value_only = fns
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
    need_h, need_w = ctx.needs_input_grad[:2] if ctx is not None else (False, False)
    grads = _SliceGrads(hidden, weight, h, acc, need_h, need_w)
    values = []
    for start in range(0, hidden.shape[0], slice_tokens):
        h_s = h[start:start + slice_tokens]
        logits = _logits_fp32(h_s, w, acc) if fp32_logits else h_s @ w.t()  # (S, V)
        other = operand(start, start + slice_tokens)
        if not grads.needed:
            values.append(value_only(logits, other, acc))
            continue
        value, g = with_grad(logits, other, acc)
        del logits, other
        values.append(value)
        grads.add(g, w, h_s, start)
    if ctx is not None:
        ctx.save_for_backward(grads.h, grads.w)
    return values


def _mean_loss(ctx, hidden, weight, compute_dtype, slice_tokens, fns, operand):
    """A sliced loss's forward: the mean over the T tokens of the slices' summed losses, summed in
    order as they come; d(hidden), d(weight) of the sum saved on ``ctx`` for ``_scaled_grads``."""
    total = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=hidden.device)
    for loss in _sliced_forward(ctx, hidden, weight, compute_dtype, slice_tokens, fns, operand):
        total += loss
    ctx.T, ctx.weight_dtype = hidden.shape[0], weight.dtype
    return total / hidden.shape[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, slice_tokens, compiled):
        # hidden: (T, H); weight: (V, H); targets: (T,) int64
        return _mean_loss(ctx, hidden, weight, compute_dtype, slice_tokens, _slice_fns(compiled),
                          lambda start, stop: targets[start:stop])

    @staticmethod
    def backward(ctx, grad_out):
        return *_scaled_grads(ctx, grad_out), None, None, None, None


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, compute_dtype, slice_tokens, compiled):
        # hidden: (T, H); weight: (V, H); teacher_hidden: (T, H_t); teacher_weight: (V, H_t)
        th, tw = teacher_hidden.to(compute_dtype), teacher_weight.to(compute_dtype)
        return _mean_loss(ctx, hidden, weight, compute_dtype, slice_tokens, _slice_fns(compiled, "kl"),
                          lambda start, stop: th[start:stop] @ tw.t())  # the teacher's (S, V) logits

    @staticmethod
    def backward(ctx, grad_out):
        return *_scaled_grads(ctx, grad_out), None, None, None, None, None


def _flatten(hidden: torch.Tensor, targets: torch.Tensor):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden vectors but {targets.shape[0]} targets")
    return hidden, targets


def _tracked(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight as the sliced losses should see them: detached unless grad mode is on.

    Their forward picks its work from ctx.needs_input_grad, which says whether an input requires
    grad, not whether autograd will use it: under no_grad (a term computed only to be reported)
    it stays True, and d(hidden) and d(weight) would be made for nothing."""
    if torch.is_grad_enabled():
        return hidden, weight
    return hidden.detach(), weight.detach()


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


@torch.no_grad()
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          slice_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For scoring: each token's log P(target) under softmax(hidden @ weight.T), and whether the
    target is its top-1 prediction, the logits made slice by slice (in fp32, as in
    ``linear_nll_and_correct``) and never stored in full.

    hidden: (..., H); weight: (V, H); targets: (...) with ids in [0, V) -> log-probabilities (N,)
    in fp32 (fp64 for fp64 inputs) and hits (N,) bool, N the number of targets.
    """
    hidden, targets = _flatten(hidden, targets)
    compute_dtype = _compute_dtype(hidden, weight)
    if slice_tokens is None:
        slice_tokens = max(1, MAX_SLICE_ELEMENTS // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        slices = _sliced_forward(None, hidden, weight, compute_dtype, slice_tokens, (None, _slice_logprobs),
                                 lambda start, stop: targets[start:stop], fp32_logits=True)
    logprobs, hits = zip(*slices)
    return torch.cat(logprobs), torch.cat(hits)


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
    hidden, weight = _tracked(hidden, weight)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, slice_tokens, compiled)


def linear_kl_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, slice_tokens: int | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats, between softmax(teacher_hidden @
    teacher_weight.T) and softmax(hidden @ weight.T), neither model's logits stored in full.

    hidden: (..., H), weight: (V, H) (the student's, which get gradients); teacher_hidden:
    (..., H_t), teacher_weight: (V, H_t) (constants: no gradient flows to them). The same slices,
    precision and fusion as ``linear_cross_entropy``; two (S, V) logits live per slice.
    """
    hidden, teacher_hidden = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if hidden.shape[0] != teacher_hidden.shape[0] or weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student ({hidden.shape[0]} tokens, vocabulary {weight.shape[0]}) and teacher "
                         f"({teacher_hidden.shape[0]} tokens, vocabulary {teacher_weight.shape[0]}) do not match")
    compute_dtype = _compute_dtype(hidden, weight)
    if slice_tokens is None:
        slice_tokens = max(1, MAX_SLICE_ELEMENTS // (2 * weight.shape[0]))  # two logits tensors a slice
    hidden, weight = _tracked(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearKL.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), compute_dtype,
                               slice_tokens, compiled)
