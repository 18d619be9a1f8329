"""The reference selective scan and the sliced linear cross-entropy against plain definitions."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from samba.ops import (linear_cross_entropy, linear_kl_divergence, linear_nll_and_correct, linear_token_logprobs,
                       selective_scan_reference)
from samba.ops.selective_scan import _prefix_scan

from conftest import count_slice_calls


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """One token at a time, straight from the recurrence (Mamba paper, Algorithm 2)."""
    delta = F.softplus(delta + delta_bias[:, None])
    Bsz, Dm, L = u.shape
    h = torch.zeros(Bsz, Dm, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]  # (B, D, N)
        h = dA * h + dBu
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * F.silu(z)


def _inputs(L, seed, Bsz=2, Dm=5, N=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return dict(u=r(Bsz, Dm, L), delta=r(Bsz, Dm, L), A=-torch.exp(r(Dm, N)), B=r(Bsz, N, L),
                C=r(Bsz, N, L), D=r(Dm), z=r(Bsz, Dm, L), delta_bias=r(Dm))


@pytest.mark.parametrize("L", [1, 2, 7, 16, 33])
def test_reference_scan_matches_recurrence_outputs_and_gradients(L):
    inputs = {k: v.requires_grad_() for k, v in _inputs(L, seed=L).items()}
    ours = selective_scan_reference(**inputs, delta_softplus=True)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, list(inputs.values()), grad_out)
    ref = naive_selective_scan(**inputs)
    ref_grads = torch.autograd.grad(ref, list(inputs.values()), grad_out)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(inputs, ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_reference_scan_keeps_input_dtype_and_computes_in_fp32():
    # bf16 inputs: the result must be the fp32 computation on those same (rounded) inputs,
    # rounded once at the end, bit for bit. Any bf16 arithmetic inside would break equality.
    x = {k: v.float() for k, v in _inputs(33, seed=3).items()}
    low = {k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in x.items()}
    out16 = selective_scan_reference(**low, delta_softplus=True)
    fp32_of_rounded = selective_scan_reference(**{k: v.float() for k, v in low.items()}, delta_softplus=True)
    assert out16.dtype == torch.bfloat16 and fp32_of_rounded.dtype == torch.float32
    assert torch.equal(out16, fp32_of_rounded.bfloat16())


def test_prefix_scan_long_decay_is_stable():
    # decays underflow to 0 over a long sequence; the scan must not produce inf or nan
    a = torch.full((1, 1, 4096, 1), 0.5)
    b = torch.ones(1, 1, 4096, 1)
    h = _prefix_scan(a, b)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0, 0, -1, 0], torch.tensor(2.0))  # geometric series 1/(1-a)


@pytest.mark.parametrize("slice_tokens", [1, 5, 64])
def test_linear_cross_entropy_matches_full_logits(slice_tokens):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 11), generator=g)
    ours = linear_cross_entropy(hidden, weight, targets, slice_tokens=slice_tokens)
    ref = F.cross_entropy((hidden @ weight.t()).view(-1, 37), targets.view(-1))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(3.0 * ours, (hidden, weight))
    g_ref = torch.autograd.grad(3.0 * ref, (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _kl_reference(hidden, weight, teacher_hidden, teacher_weight):
    """Mean per-token KL(teacher || student) from full fp64 logits, the textbook sum."""
    log_ps = torch.log_softmax((hidden @ weight.t()).reshape(-1, weight.shape[0]).double(), dim=-1)
    log_pt = torch.log_softmax((teacher_hidden @ teacher_weight.t()).reshape(-1, weight.shape[0]).double(), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


@pytest.mark.parametrize("slice_tokens,dtype", [(1, torch.float64), (5, torch.float64), (64, torch.float64),
                                                (7, torch.float32)])
def test_linear_kl_divergence_matches_full_logits_in_fp64(slice_tokens, dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 11, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(2, 11, 6, generator=g, dtype=torch.float64).to(dtype)  # another width
    teacher_weight = torch.randn(37, 6, generator=g, dtype=torch.float64).to(dtype)
    ours = linear_kl_divergence(hidden, weight, teacher_hidden, teacher_weight, slice_tokens=slice_tokens)
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    ref = _kl_reference(*ref_in, teacher_hidden.double(), teacher_weight.double())
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert ref > 0.5  # distributions that really differ
    torch.testing.assert_close(ours.double(), ref, **tol)
    g_ours = torch.autograd.grad(3.0 * ours, (hidden, weight))
    g_ref = torch.autograd.grad(3.0 * ref, ref_in)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, **tol)


def test_linear_kl_divergence_of_a_model_to_itself_is_zero_and_refuses_mismatches():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g)
    assert linear_kl_divergence(hidden, weight, hidden, weight, slice_tokens=4).abs() < 1e-6
    with pytest.raises(ValueError, match="do not match"):
        linear_kl_divergence(hidden, weight, hidden[:5], weight)
    with pytest.raises(ValueError, match="do not match"):
        linear_kl_divergence(hidden, weight, hidden, weight[:10])


def test_linear_cross_entropy_computes_gradients_only_when_autograd_uses_them(monkeypatch):
    # Under no_grad the inputs still require grad (ctx.needs_input_grad stays True), yet
    # nothing will call backward: every slice must take the loss-only path, same value.
    calls = count_slice_calls(monkeypatch)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 11), generator=g)
    ref = F.cross_entropy((hidden @ weight.t()).view(-1, 37), targets.view(-1)).detach()
    with torch.no_grad():
        ours = linear_cross_entropy(hidden, weight, targets, slice_tokens=5)  # 5 slices
    assert calls == {"grad": 0, "loss": 5} and not ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    calls.update(grad=0, loss=0)  # grad mode on: every slice gives its share of the gradient
    linear_cross_entropy(hidden, weight, targets, slice_tokens=5).backward()
    assert calls == {"grad": 5, "loss": 0} and hidden.grad is not None and weight.grad is not None


def test_linear_kl_divergence_computes_gradients_only_when_autograd_uses_them(monkeypatch):
    # as for the cross-entropy: a KL computed under no_grad (distill_weight 0 with a teacher,
    # reported only) takes the loss-only path in every slice, same value
    calls = count_slice_calls(monkeypatch, "kl")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(37, 6, generator=g, dtype=torch.float64)
    ref = _kl_reference(hidden.detach(), weight.detach(), teacher_hidden, teacher_weight)
    with torch.no_grad():
        ours = linear_kl_divergence(hidden, weight, teacher_hidden, teacher_weight, slice_tokens=5)
    assert calls == {"grad": 0, "loss": 5} and not ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    calls.update(grad=0, loss=0)
    linear_kl_divergence(hidden, weight, teacher_hidden, teacher_weight, slice_tokens=5).backward()
    assert calls == {"grad": 5, "loss": 0} and hidden.grad is not None and weight.grad is not None


def test_linear_kl_divergence_slices_by_default(monkeypatch):
    # by default no slice holds more than MAX_SLICE_ELEMENTS logits of either model
    import importlib

    from conftest import count_slice_calls

    module = importlib.import_module("samba.ops.linear_cross_entropy")
    monkeypatch.setattr(module, "MAX_SLICE_ELEMENTS", 2 * 37 * 4)  # two (4, 37) logits a slice
    calls = count_slice_calls(monkeypatch, "kl")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(22, 8, generator=g, requires_grad=True)
    weight, teacher = torch.randn(37, 8, generator=g), torch.randn(22, 8, generator=g)
    sliced = linear_kl_divergence(hidden, weight, teacher, weight)
    sliced.backward()
    assert calls == {"grad": 6, "loss": 0}  # ceil(22 / 4) slices
    whole = linear_kl_divergence(hidden.detach(), weight, teacher, weight, slice_tokens=22)
    torch.testing.assert_close(sliced, whole)


def test_linear_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="hidden vectors but"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_reference_scan_last_state_is_the_recurrence_state():
    inputs = _inputs(13, seed=5)
    _, last = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    h = torch.zeros_like(last)
    for t in range(13):
        h = torch.exp(delta[:, :, t, None] * inputs["A"]) * h + (delta[:, :, t, None] * inputs["B"][:, None, :, t]
                                                                * inputs["u"][:, :, t, None])
    torch.testing.assert_close(last, h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("slice_tokens", [1, 7, 64])
def test_nll_and_top1_for_evaluation_match_full_logits(slice_tokens):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(41, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 41, (3, 9), generator=g)
    targets[0, :4] = (hidden[0, :4] @ weight.t()).argmax(-1)  # some right answers for sure
    nll, correct = linear_nll_and_correct(hidden, weight, targets, slice_tokens=slice_tokens)
    logits = (hidden @ weight.t()).view(-1, 41)
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets.view(-1), reduction="sum"), rtol=1e-12, atol=1e-12)
    assert int(correct) == int((logits.argmax(-1) == targets.view(-1)).sum()) >= 4


@pytest.mark.parametrize("slice_tokens", [1, 4, 64, None])
def test_token_logprobs_for_scoring_match_full_logits_in_fp64(slice_tokens):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(41, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 41, (3, 9), generator=g)
    targets[1, 2:6] = (hidden[1, 2:6] @ weight.t()).argmax(-1)  # some right answers for sure
    logprobs, hits = linear_token_logprobs(hidden, weight, targets, slice_tokens=slice_tokens)
    full = (hidden @ weight.t()).view(-1, 41).log_softmax(-1)  # (27, 41)
    want = full.gather(1, targets.view(-1, 1)).squeeze(1)
    assert logprobs.shape == hits.shape == (27,) and logprobs.dtype == torch.float64 and hits.dtype == torch.bool
    torch.testing.assert_close(logprobs, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(hits, full.argmax(-1) == targets.view(-1)) and int(hits.sum()) >= 4


def _package(root, name, init):
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(init)
    (root / name / "sub.py").write_text("VALUE = 41\n")


def test_deferred_package_init_runs_on_first_use_of_the_package(tmp_path, monkeypatch):
    """mamba-ssm's submodules import without its slow __init__; the package still works after."""
    from samba.ops.kernels import defer_package_init

    log = types.ModuleType("_samba_init_log")
    log.runs = 0
    monkeypatch.setitem(sys.modules, "_samba_init_log", log)
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "deferpkg", "import _samba_init_log\n_samba_init_log.runs += 1\n"
                                    "from deferpkg.sub import VALUE\nTOP = VALUE + 1\n")
    _package(tmp_path, "brokenpkg", "raise RuntimeError('broken __init__')\n")
    for name in ("deferpkg", "deferpkg.sub", "brokenpkg", "brokenpkg.sub"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    defer_package_init("deferpkg")
    from deferpkg.sub import VALUE

    assert VALUE == 41 and log.runs == 0
    from deferpkg import TOP  # a name of the package itself: its __init__ runs now

    assert TOP == 42 and log.runs == 1
    assert sys.modules["deferpkg"].TOP == 42 and sys.modules["deferpkg"].sub.VALUE == 41
    with pytest.raises(AttributeError):
        sys.modules["deferpkg"].missing
    defer_package_init("deferpkg")  # imported already: nothing changes
    assert log.runs == 1

    defer_package_init("brokenpkg")
    importlib.import_module("brokenpkg.sub")

    for _ in range(2):  # a failing __init__ fails at each use, as a normal import would
        with pytest.raises(RuntimeError, match="broken"):
            sys.modules["brokenpkg"].anything

    defer_package_init("no_such_package_here")
    assert "no_such_package_here" not in sys.modules
