"""Selective scan (Mamba, Gu & Dao 2023, Algorithm 2) in plain PyTorch.

The reference twin of mamba-ssm's ``selective_scan_fn`` CUDA kernel: same arguments, same
layouts, same function. The recurrence

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (state, per channel d and n)
    y_t = <h_t, C_t> + D * u_t,   then  y_t * silu(z_t)

is linear in h, so it is evaluated with a parallel prefix scan (log2 L vectorised steps)
instead of a Python loop over tokens, and its backward pass is the adjoint recurrence run
backwards, so only the states h are kept for the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prefix_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of h_t = a_t * h_{t-1} + b_t with h_{-1} = 0, along dim 2.

    Hillis-Steele scan: after the step with offset k, (a_t, b_t) summarise the last 2k terms.
    Each right-hand side is computed before it is written, so the in-place slices are safe.
    a, b: (B, D, L, N) -> h: (B, D, L, N)
    """
    a, b = a.clone(), b.clone()
    L = a.shape[2]
    k = 1
    while k < L:
        b[:, :, k:] += a[:, :, k:] * b[:, :, :-k]
        a[:, :, k:] = a[:, :, k:] * a[:, :, :-k]
        k *= 2
    return b


class LinearRecurrence(torch.autograd.Function):
    """h = scan(a, b); backward runs the adjoint scan, lambda_t = g_t + a_{t+1} * lambda_{t+1}."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _prefix_scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[:, :, 1:], (0, 0, 0, 1))  # a_{t+1}, zero past the end
        lam = _prefix_scan(a_next.flip(2), grad_h.flip(2)).flip(2)
        h_prev = F.pad(h[:, :, :-1], (0, 0, 1, 0))  # h_{t-1}, zero before the start
        return lam * h_prev, lam


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Plain-PyTorch ``selective_scan_fn`` (real A, input-dependent B and C).

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,).
    Computes in fp32 (fp64 for fp64 inputs) like the kernel and returns (B, D, L) in u's dtype,
    and with ``return_last_state`` also the state after the last token, (B, D, N) fp32.
    """
    dtype_in = u.dtype
    f = torch.promote_types(dtype_in, torch.float32)  # fp32 at least, fp64 stays fp64
    u, delta = u.to(f), delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(delta.unsqueeze(-1) * A.to(f)[:, None, :])  # (B, D, L, N)
    deltaB_u = (delta * u).unsqueeze(-1) * B.to(f).transpose(1, 2).unsqueeze(1)  # (B, D, L, N)
    h = LinearRecurrence.apply(deltaA, deltaB_u)  # (B, D, L, N)
    y = (h * C.to(f).transpose(1, 2).unsqueeze(1)).sum(-1)  # (B, D, L); keeps h, no layout copy
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    if return_last_state:
        return y.to(dtype_in), h[:, :, -1]
    return y.to(dtype_in)
