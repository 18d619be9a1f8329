"""Readout causality, the combined loss against a hand calculation, and where gradients go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samba import ModelConfig, Samba
from samba.loss import PART_NAMES, SambaObjective, samba_loss
from samba.sparsity import PENALTIES
from samba.config import TrainingConfig
from samba.train import training_objective, training_step

from conftest import count_slice_calls, perturb_

CFG = ModelConfig(vocab_size=50, d_model=16, n_layers=6, d_state=4, d_conv=4, expand_factor=2,
                  readout_hidden_dim=12, readout_stride=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Samba(CFG)
    perturb_(m)
    return m


def _batch(seed=0, B=2, L=19):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, L + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_output_shapes(model):
    ids, _ = _batch()
    out = model(ids)
    assert out.logits.shape == out.readout_logits.shape == (2, 19, 50)
    assert len(out.chunk_outputs) == 3 and all(c.shape == (2, 19, 16) for c in out.chunk_outputs)
    assert out.logits.dtype == out.readout_logits.dtype == torch.float32


@pytest.mark.parametrize("t", [0, 7, 18])
def test_readout_and_main_head_are_causal(model, t):
    ids, _ = _batch()
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    for name in ("logits", "readout_logits"):
        x, y = getattr(a, name), getattr(b, name)
        torch.testing.assert_close(x[:, :t], y[:, :t], rtol=0, atol=0, msg=f"{name} before {t}")
        assert (x[:, t] - y[:, t]).abs().max() > 1e-4, f"{name} at {t} ignores token {t}"


def test_readout_attends_over_chunks(model):
    # the readout must see every chunk: changing an early chunk's output changes its logits
    ids, _ = _batch()
    with torch.no_grad():
        chunks = list(model.chunk_outputs(ids))
        base = model.readout(chunks)
        chunks[0] = chunks[0] + 1.0
        assert (model.readout(chunks) - base).abs().max() > 1e-4


def _hand_penalty(chunks, penalty):
    if penalty == "l1":
        return torch.cat([c.abs().reshape(-1) for c in chunks]).mean()
    # Hoyer: per token sum|x| / (sqrt(d) * sqrt(sum x^2)), mean over tokens, then over chunks
    per_chunk = []
    for c in chunks:
        rows = c.reshape(-1, c.shape[-1]).tolist()
        per_chunk.append(sum(sum(abs(v) for v in r) / (len(r) ** 0.5 * sum(v * v for v in r) ** 0.5)
                             for r in rows) / len(rows))
    return torch.tensor(sum(per_chunk) / len(per_chunk))


@pytest.mark.parametrize("penalty", ["l1", "hoyer"])
def test_loss_parts_against_hand_calculation(model, penalty):
    ids, targets = _batch()
    parts = samba_loss(model, ids, targets, readout_weight=0.3, pruning_weight=0.07, penalty=penalty)
    with torch.no_grad():
        out = model(ids)
    main = F.cross_entropy(out.logits.reshape(-1, 50), targets.reshape(-1))
    readout = F.cross_entropy(out.readout_logits.reshape(-1, 50), targets.reshape(-1))
    pen = _hand_penalty(out.chunk_outputs, penalty)
    torch.testing.assert_close(parts.main_ce.detach(), main, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.readout_ce.detach(), readout, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.penalty.detach(), pen, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.total.detach(), main + 0.3 * readout + 0.07 * pen, rtol=1e-5, atol=1e-6)


def test_unknown_penalty_is_refused(model):
    with pytest.raises(ValueError, match="penalty must be one of"):
        samba_loss(model, *_batch(), 0.5, 0.05, penalty="l2")


def test_zero_weights_give_plain_next_token_cross_entropy(model):
    ids, targets = _batch(seed=3)
    parts = samba_loss(model, ids, targets, readout_weight=0.0, pruning_weight=0.0)
    with torch.no_grad():
        logits = model(ids).logits
    plain = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))
    torch.testing.assert_close(parts.total.detach(), plain, rtol=1e-5, atol=1e-6)
    # and its gradient is the plain CE gradient (no readout or L1 term leaks in)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    F.cross_entropy(model(ids).logits.reshape(-1, 50), targets.reshape(-1)).backward()
    for n, p in model.named_parameters():
        if n.startswith("readout."):
            assert n not in grads or grads[n].abs().max() == 0
        else:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("penalty", ["l1", "hoyer"])
def test_penalty_is_taken_on_the_dense_chunk_outputs_before_top_k(model, penalty):
    # The penalty sees each chunk's output before top-k zeroes its smallest entries, so that it
    # pushes exactly those entries towards 0. Taken after top-k it would see other numbers, and
    # no gradient would reach the dropped entries (d/dx of x * mask is the mask).
    model.set_sparsity_target(0.5)  # 8 of 16 entries zeroed per token, training's device-tensor path
    ids, targets = _batch()
    seen = []  # each chunk's output as the model made it, its gradient kept

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    hooks = [chunk.register_forward_hook(keep) for chunk in model.chunks]
    parts = samba_loss(model, ids, targets, readout_weight=0.0, pruning_weight=1.0, penalty=penalty)
    for hook in hooks:
        hook.remove()
    parts.penalty.backward()
    # by hand: chunk by chunk, the 8 smallest |x| zeroed by sorting before the next chunk
    with torch.no_grad():
        x, dense, sparse = model.embedding(ids).float(), [], []
        for chunk in model.chunks:
            x = chunk(x)
            dense.append(x)
            x = x.scatter(-1, x.abs().argsort(dim=-1, stable=True)[..., :8], 0.0)
            sparse.append(x)
    on_dense, on_sparse = PENALTIES[penalty](dense), PENALTIES[penalty](sparse)
    torch.testing.assert_close(parts.penalty.detach(), on_dense, rtol=1e-6, atol=0)
    assert (on_dense - on_sparse).abs() > 0.05 * on_dense  # the two places give different numbers
    # a dropped entry's gradient is the penalty's own (nothing downstream sees it): not 0
    leaves = [d.clone().requires_grad_() for d in dense]
    direct = torch.autograd.grad(PENALTIES[penalty](leaves), leaves)
    for c, (out, s, d) in enumerate(zip(seen, sparse, direct)):
        dropped = s == 0
        assert int(dropped.sum()) == 8 * s.shape[0] * s.shape[1], c
        assert (d[dropped] != 0).all(), c
        torch.testing.assert_close(out.grad[dropped], d[dropped], rtol=1e-5, atol=1e-12, msg=f"chunk {c}")


def test_a_zero_weight_term_is_reported_without_gradient_work(model, monkeypatch):
    # readout_weight 0 and pruning_weight 0 in a training step, the readout left trainable (the
    # train stage also freezes it): its CE and the penalty are computed for the log only, so the
    # sliced CE makes the main head's gradient and no other; the reported values are exact.
    calls = count_slice_calls(monkeypatch)
    ids, targets = _batch(seed=4)
    with torch.no_grad():
        out = model(ids)
    expected = {"main_ce": F.cross_entropy(out.logits.reshape(-1, 50), targets.reshape(-1)),
                "readout_ce": F.cross_entropy(out.readout_logits.reshape(-1, 50), targets.reshape(-1)),
                "penalty": _hand_penalty(out.chunk_outputs, "hoyer")}
    expected["loss"] = expected["main_ce"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = training_step(SambaObjective(model, 0.0, 0.0, "hoyer"), optimizer, list(model.parameters()),
                         1.0, torch.device("cpu"), None)
    values = step(ids, targets)
    assert calls == {"grad": 1, "loss": 1}  # main head: loss and gradient; readout: loss only
    for name, value in zip(PART_NAMES, values):
        torch.testing.assert_close(value, expected[name].float(), rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.readout.parameters())


def test_the_stage_objective_freezes_an_unweighted_readout_and_still_reports_it(model):
    # train.training_objective (what the train stage and benchmarks/train_step.py build)
    ids, targets = _batch(seed=5)
    with torch.no_grad():
        readout = F.cross_entropy(model(ids).readout_logits.reshape(-1, 50), targets.reshape(-1))
    training_objective(model, TrainingConfig(readout_weight=0.5))
    assert all(p.requires_grad for p in model.parameters())
    objective = training_objective(model, TrainingConfig(readout_weight=0.0, pruning_weight=0.05,
                                                         pruning_penalty="l1"))
    assert (objective.readout_weight, objective.pruning_weight, objective.penalty) == (0.0, 0.05, "l1")
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith("readout."), name
    total, values = objective(ids, targets)
    torch.testing.assert_close(values[2], readout, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_trainable_parameter(model):
    # In fp64, so that a gradient that is 0 in exact arithmetic (as the readout's key bias was:
    # the softmax cancels a shift shared by every key) cannot pass on rounding noise: each
    # parameter's gradient must be a real share of the largest.
    model.double()
    ids, targets = _batch()
    samba_loss(model, ids, targets, readout_weight=0.5, pruning_weight=0.05).total.backward()
    norms = {name: p.grad.norm().item() if p.grad is not None else 0.0 for name, p in model.named_parameters()}
    largest = max(norms.values())
    for name, norm in norms.items():
        assert norm > 1e-6 * largest, f"{name}: gradient norm {norm:.3e} vs largest {largest:.3e}"


def test_frozen_backbone_trains_only_the_readout(model):
    model.freeze_backbone()
    ids, targets = _batch()
    parts = samba_loss(model, ids, targets, readout_weight=0.5, pruning_weight=0.05)
    parts.total.backward()
    for name, p in model.named_parameters():
        if name.startswith("readout."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("penalty", ["l1", "hoyer"])
def test_pruning_term_goes_down_when_followed(model, penalty):
    # one SGD step on the penalty alone must lower it
    ids, targets = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = samba_loss(model, ids, targets, 0.0, 1.0, penalty=penalty)
    before.penalty.backward()
    opt.step()
    after = samba_loss(model, ids, targets, 0.0, 1.0, penalty=penalty)
    assert after.penalty < before.penalty


def test_bad_input_shape_is_refused(model):
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_backend_choice(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        Samba(CFG, backend="fast")
    model.set_backend("kernels")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        model(_batch()[0])


def test_readout_attention_equals_scaled_dot_product_attention(model):
    # the written-out attention computes what torch's SDPA computes for one query over C keys
    ids, _ = _batch()
    r = model.readout
    with torch.no_grad():
        chunks = model.chunk_outputs(ids)
        x = r.norm(torch.stack(chunks, dim=2))
        expected = F.scaled_dot_product_attention(r.query(x[:, :, -1:]), r.key(x), r.value(x)).squeeze(2)
        torch.testing.assert_close(r.features(chunks), expected, rtol=1e-5, atol=1e-6)
