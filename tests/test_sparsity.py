"""Exact top-k zeros, the penalties, the measures and the prune curve, each against an
independent computation; a Samba directory as the pretrained source."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samba import ModelConfig, Samba
from samba.config import ConfigError, Params
from samba.convert import convert
from samba.data import TokenWindows
from samba.evaluate import evaluate_model, pca_bases, prune_curve, prune_curve_in_basis
from samba.sparsity import (SecondMoment, SparsityCounter, hoyer_penalty, keep_largest, keep_largest_in_basis,
                            l1_penalty, ramp, zero_count)

from conftest import perturb_, relative_error, tiny_params

CFG = ModelConfig(vocab_size=50, d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8, readout_stride=2)


# ----------------------------------------------------------------------------- top-k

@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_keep_largest_zeroes_exactly_the_smallest(fraction):
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    n_zero = zero_count(fraction, 40)
    y = keep_largest(x, n_zero)
    for vec, out in zip(x.reshape(-1, 40), y.reshape(-1, 40)):
        kept = set(vec.abs().argsort(descending=True)[:40 - n_zero].tolist())  # sorting, independently
        assert {i for i in range(40) if out[i] != 0} == kept
        assert torch.equal(out[sorted(kept)], vec[sorted(kept)])  # kept entries unchanged
        assert int((out == 0).sum()) == n_zero


def test_keep_largest_count_is_exact_with_ties():
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, 2.0, -1.0, 0.5, 1.0]])  # five entries tie at |x| = 1
    for n_zero in range(9):
        y = keep_largest(x, n_zero)
        assert int((y == 0).sum()) == n_zero
        assert y.abs().sum() == x.abs().sort(-1).values[0, n_zero:].sum()  # the largest survive
        # a device-tensor count (training's ramp) ranks by a stable sort: same count, same sum
        z = keep_largest(x, torch.tensor(n_zero))
        assert int((z == 0).sum()) == n_zero and z.abs().sum() == y.abs().sum()
    untied = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    for n_zero in (0, 7, 29):  # without ties the two paths keep the same entries
        assert torch.equal(keep_largest(untied, torch.tensor(n_zero)), keep_largest(untied, n_zero))


def test_gradient_reaches_kept_entries_only():
    x = torch.randn(4, 12, requires_grad=True, generator=torch.Generator().manual_seed(1))
    y = keep_largest(x, 9)
    (y * torch.arange(12.0)).sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad, torch.where(kept, torch.arange(12.0).expand(4, 12), torch.tensor(0.0)))


def test_ramp():
    assert [ramp(s, 4, 0.8) for s in (0, 1, 2, 4, 9)] == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    assert ramp(0, 0, 0.8) == 0.8


def test_sparse_model_zeroes_every_chunk_output_and_the_zeros_flow_on():
    torch.manual_seed(0)
    model = Samba(CFG).eval()
    perturb_(model)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        dense = model(ids)
        model.set_sparsity_target(0.5)
        sparse = model(ids)
    for c in sparse.chunk_outputs:
        assert torch.equal((c == 0).sum(-1), torch.full((2, 9), 8))
    # by hand: zero chunk 0's output, run chunk 1 on it, zero again, then the heads
    with torch.no_grad():
        x = model.chunks[0](model.embedding(ids).float())
        x0 = keep_largest(x, 8)
        x1 = keep_largest(model.chunks[1](x0), 8)
        logits = F.linear(model.norm_f(x1), model.embedding.weight)
        readout = model.readout([x0, x1])
    assert torch.equal(sparse.logits, logits) and torch.equal(sparse.readout_logits, readout)
    assert not torch.equal(sparse.logits, dense.logits)


def test_sparsity_target_is_saved_loaded_and_applied(tmp_path):
    model = Samba(CFG)
    model.set_sparsity_target(0.75)
    model.save_pretrained(tmp_path / "m")
    again = Samba.from_pretrained(tmp_path / "m")
    assert again.config.sparsity_target == 0.75
    with torch.no_grad():
        out = again(torch.randint(0, 50, (1, 6)))
    assert all(int((c == 0).sum()) == 6 * 12 for c in out.chunk_outputs)


# ----------------------------------------------------------------------------- penalties

def test_hoyer_is_scale_free_and_l1_is_not():
    chunks = [torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scaled = [0.01 * c for c in chunks]
    assert hoyer_penalty(scaled) == pytest.approx(hoyer_penalty(chunks).item(), rel=1e-5)
    assert l1_penalty(scaled) == pytest.approx(0.01 * l1_penalty(chunks).item(), rel=1e-5)
    one_hot = torch.zeros(1, 1, 16)
    one_hot[..., 3] = 5.0
    assert hoyer_penalty([one_hot]) == pytest.approx(1 / 4)  # 1 / sqrt(16)
    assert hoyer_penalty([torch.ones(1, 1, 16)]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- measures

def test_counter_against_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(3, 10, 8, generator=g) for _ in range(2)]
    chunks[0][..., 2] = 0.0  # a dead dimension
    chunks[1][0, :, :4] = 0.0  # zeros, but not in 99% of tokens
    chunks[1][1, 3, 5] = 40.0  # an outlier
    counter = SparsityCounter(2, 8, eps=0.5, rel=0.3, bins=10, device=torch.device("cpu"))
    counter.update(chunks[:1] + chunks[1:])
    r = counter.result()
    for c, x in enumerate(chunks):
        t = x.reshape(-1, 8).double()
        rms = t.pow(2).mean(-1).sqrt()
        p = r["per_chunk"][str(c)]
        assert p["l0"] == pytest.approx((t == 0).double().mean().item())
        assert p["near_zero"] == pytest.approx((t.abs() < 0.5).double().mean().item())
        assert p["near_zero_rel"] == pytest.approx((t.abs() < 0.3 * rms[:, None]).double().mean().item())
        assert r["chunk_rms"][str(c)] == pytest.approx(rms.mean().item(), rel=1e-6)
        assert r["max_over_rms"][str(c)] == pytest.approx((t.abs().max(-1).values / rms).mean().item(), rel=1e-6)
    assert r["per_chunk"]["0"]["dead_fraction"] == pytest.approx(1 / 8)
    assert r["per_chunk"]["1"]["dead_fraction"] == 0.0
    assert r["dead_fraction"] == pytest.approx(1 / 16)
    assert r["l0_min_chunk"] == min(r["per_chunk"]["0"]["l0"], r["per_chunk"]["1"]["l0"])


def zero_smallest(x, n_zero):
    """x with its n_zero smallest |entries| of the last dimension zeroed, by sorting."""
    order = x.abs().argsort(dim=-1, stable=True)
    return x.scatter(-1, order[..., :n_zero], 0.0)


def hand_ppl(model, windows, after_chunk):
    """(main, readout) ppl of ``model`` over ``windows``, each chunk's output passed through
    ``after_chunk(c, x)``, from full logits and plain CE."""
    nll = r_nll = 0.0
    with torch.no_grad():
        for inputs, targets in windows.batches(4):
            x, outs = model.embedding(inputs).float(), []
            for c, chunk in enumerate(model.chunks):
                x = after_chunk(c, chunk(x))
                outs.append(x)
            logits = model.norm_f(x) @ model.embedding.weight.t()
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            r_nll += F.cross_entropy(model.readout(outs).flatten(0, 1), targets.flatten(), reduction="sum").item()
    n = len(windows) * windows.seq_len
    return math.exp(nll / n), math.exp(r_nll / n)


def test_prune_curve_against_an_independent_computation():
    torch.manual_seed(3)
    model = Samba(CFG).eval()
    perturb_(model)
    tokens = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(4))
    windows = TokenWindows(tokens, seq_len=16)
    main, _ = evaluate_model(model, windows, 4, desc=None)
    curve = prune_curve(model, windows, (0.0, 0.5, 0.75), main, 4, desc=None)

    def by_hand(fraction):
        """Zero the smallest fraction after each chunk by sorting, full logits, plain CE."""
        n_zero = round(fraction * 16)
        return hand_ppl(model, windows, lambda c, x: zero_smallest(x, n_zero))

    for f in (0.0, 0.5, 0.75):
        ppl, r_ppl = by_hand(f)
        assert curve[f"{f:g}"]["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert curve[f"{f:g}"]["readout_ppl"] == pytest.approx(r_ppl, rel=1e-5)
    assert curve["0.75"]["ppl"] != curve["0"]["ppl"]
    assert model.config.sparsity_target == 0 and not model.sparse  # left as it was
    # a model trained with target t: its points below t are its own (it always zeroes t)
    model.set_sparsity_target(0.5)
    m5, _ = evaluate_model(model, windows, 4, desc=None)
    curve5 = prune_curve(model, windows, (0.0, 0.5, 0.75), m5, 4, desc=None)
    assert curve5["0"]["ppl"] == curve5["0.5"]["ppl"] == pytest.approx(curve["0.5"]["ppl"], rel=1e-6)
    assert curve5["0.75"]["ppl"] == pytest.approx(curve["0.75"]["ppl"], rel=1e-6)


# ----------------------------------------------------------------------------- pruning in the PCA basis

def test_the_pca_basis_is_orthonormal_and_holds_the_principal_axes():
    gen = torch.Generator().manual_seed(5)
    # correlated data: a random mixing of coordinates of very different scales
    x = (torch.randn(2, 300, 16, generator=gen) * torch.logspace(0, -2, 16)) @ torch.randn(16, 16, generator=gen)
    moment = SecondMoment(n_chunks=2, d_model=16, device=torch.device("cpu"))
    moment.update([x[0], x[1]])
    moment.update([x[0, :100], x[1, :100]])  # a second batch adds up
    for c, basis in enumerate(moment.bases()):
        assert relative_error(basis.t() @ basis, torch.eye(16)) < 1e-5
        data = torch.cat([x[c], x[c, :100]]).double()
        second = data.t() @ data / len(data)
        projected = basis.double().t() @ second @ basis.double()  # diagonal, by decreasing variance
        eigenvalues = torch.linalg.eigvalsh(second).flip(0)
        assert relative_error(projected.diagonal(), eigenvalues) < 1e-5
        assert (projected - torch.diag(projected.diagonal())).abs().max() < 1e-5 * eigenvalues[0]


def test_keep_largest_in_basis_zeroes_coordinates_in_that_basis():
    x = torch.tensor([[3.0, 1.0, 0.5, 2.0]])
    assert torch.equal(keep_largest_in_basis(x, 2, torch.eye(4)), keep_largest(x, 2))
    # a rotation of the first two axes by 45 degrees: coordinates (4, 2)/sqrt(2), 0.5, 2
    c = 2 ** -0.5
    basis = torch.tensor([[c, -c, 0, 0], [c, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    kept = keep_largest_in_basis(x, 2, basis)  # keeps 4/sqrt(2) and 2; drops 2/sqrt(2) and 0.5
    assert torch.allclose(kept, torch.tensor([[2.0, 2.0, 0.0, 2.0]]), atol=1e-6)
    assert torch.equal(keep_largest_in_basis(x, 0, basis), x)


@pytest.mark.parametrize("target", [0.0, 0.25])
def test_prune_curve_in_the_pca_basis_against_a_hand_computation(target):
    # a dense model, and one with its own top-k (0.25 of 16 = 4 zeros, in the native basis first)
    torch.manual_seed(3)
    model = Samba(CFG).eval()
    perturb_(model)
    model.set_sparsity_target(target)
    gen = torch.Generator().manual_seed(4)
    test = TokenWindows(torch.randint(0, 50, (200,), generator=gen), seq_len=16)
    validation = TokenWindows(torch.randint(0, 50, (300,), generator=gen), seq_len=16)
    main, _ = evaluate_model(model, test, 4, desc=None)
    bases = pca_bases(model, validation, 4, n_windows=12)
    curve = prune_curve_in_basis(model, test, (0.0, 0.6, 0.75), main, 4, bases, desc=None)
    assert curve["0"] == {"fraction": 0.0, "ppl": main["ppl"], "readout_ppl": main["readout_ppl"]}
    assert model.prune_basis is None  # left as it was
    model.set_prune_basis(bases, 0.6)
    assert model.prune_basis_zeros == 10  # round(0.6 x 16) = round(9.6)
    model.set_prune_basis(None)
    n_native = round(target * 16)

    def native_top_k(x):
        return zero_smallest(x, n_native)

    with torch.no_grad():  # each chunk's axes by hand: eigenvectors of its outputs' second moment
        outputs = [[] for _ in model.chunks]
        for inputs, _ in validation.batches(4, 12):
            x = model.embedding(inputs).float()
            for c, chunk in enumerate(model.chunks):
                x = native_top_k(chunk(x))  # the outputs as they flow on
                outputs[c].append(x.reshape(-1, 16).double())
        axes = [torch.linalg.eigh(torch.cat(o).t() @ torch.cat(o))[1].float() for o in outputs]

    def by_hand(fraction):
        # the model's own zeros, then coordinates on the axes, zeroed there, rotated back
        n_zero = round(fraction * 16)
        return hand_ppl(model, test, lambda c, x: zero_smallest(native_top_k(x) @ axes[c], n_zero) @ axes[c].t())

    assert by_hand(0.0)[0] == pytest.approx(main["ppl"], rel=1e-5)  # the hand model is the model
    for f in (0.6, 0.75):
        ppl, r_ppl = by_hand(f)
        assert curve[f"{f:g}"]["ppl"] == pytest.approx(ppl, rel=1e-4)
        assert curve[f"{f:g}"]["readout_ppl"] == pytest.approx(r_ppl, rel=1e-4)
    native = prune_curve(model, test, (0.75,), main, 4, desc=None)
    assert curve["0.75"]["ppl"] != pytest.approx(native["0.75"]["ppl"], rel=1e-3)  # another basis, another model


# ----------------------------------------------------------------------------- config and sources

@pytest.mark.parametrize("section,key,value,match", [
    ("model", "sparsity_target", 1.0, r"model.sparsity_target: must be in \[0, 1\)"),
    ("model", "sparsity_target", -0.1, r"model.sparsity_target: must be in \[0, 1\)"),
    ("training", "pruning_penalty", "l2", r"training.pruning_penalty: must be one of \['l1', 'hoyer'\]"),
    ("training", "keep", "first", r"training.keep: must be one of \['last', 'best'\]"),
    ("training", "sparsity_warmup_steps", -1, r"training.sparsity_warmup_steps: must be >= 0"),
    ("training", "sparsity_warmup_fraction", 1.5, r"training.sparsity_warmup_fraction: must be in \[0, 1\]"),
    # tiny_params' sparsity_warmup_steps is 0; here both are set
    ("training", "sparsity_warmup_fraction", 0.2, None),
    ("eval", "prune_fractions", [0.5, 1.0], r"eval.prune_fractions\[1\]: must be in \[0, 1\)"),
    ("eval", "prune_fractions", 0.5, r"eval.prune_fractions: must be a list"),
    ("eval", "prune_fractions", [], r"eval.prune_fractions: must list at least one fraction"),
    # d_model 16: 0.97 x 16 = 15.52 rounds to 16, every entry
    ("model", "sparsity_target", 0.97,
     r"model.sparsity_target: 0.97 of d_model=16 rounds to 16: every entry would be 0"),
])
def test_bad_sparsity_values_are_refused_naming_the_key(sources, section, key, value, match):
    data = tiny_params(sources)
    data[section][key] = value
    if match is None:  # a fraction beside a number of steps
        data["training"]["sparsity_warmup_steps"] = 100
        match = r"training.sparsity_warmup_fraction: is 0.2 while sparsity_warmup_steps is 100: the ramp is one"
    with pytest.raises(ConfigError, match=match):
        Params.from_dict(data, require_all=True)


def test_a_samba_directory_seeds_the_pipeline(sources, tmp_path):
    # what the train stage writes (readout trained, sparsity on) as pretrained.model_name:
    # convert checks it against transformers and writes the dense baseline, readout kept
    data = tiny_params(sources)
    params = Params.from_dict(data, require_all=True)
    convert(params, tmp_path / "first")
    trained = Samba.from_pretrained(tmp_path / "first")
    perturb_(trained, seed=9)
    trained.set_sparsity_target(0.5)
    trained.save_pretrained(tmp_path / "stand_in")
    data["pretrained"]["model_name"] = str(tmp_path / "stand_in")
    report = convert(Params.from_dict(data, require_all=True), tmp_path / "init")
    assert report["format"] == "samba" and report["logits_relative_error"] < 1e-5
    init = Samba.from_pretrained(tmp_path / "init")
    assert init.config.sparsity_target == 0.0
    for key, value in trained.state_dict().items():
        assert torch.equal(init.state_dict()[key], value), key
    # a model section that disagrees with the Samba source is refused
    data["model"]["readout_hidden_dim"] = 12
    with pytest.raises(Exception, match="readout_hidden_dim"):
        convert(Params.from_dict(data, require_all=True), tmp_path / "init2")
    assert relative_error(init.embedding.weight, trained.embedding.weight) == 0


@pytest.mark.parametrize("fraction,zeros", [(0.3, 5), (0.2, 3), (0.6, 10), (0.9, 14)])
def test_a_fraction_that_is_no_whole_count_zeroes_the_nearest_count(fraction, zeros):
    # d_model 16, by hand: 0.3 x 16 = 4.8 -> 5, 0.2 x 16 = 3.2 -> 3, 0.6 x 16 = 9.6 -> 10,
    # 0.9 x 16 = 14.4 -> 14 (the nearest count: neither floor nor ceiling gets all four)
    assert zero_count(fraction, 16) == zeros
    assert int(zero_count(torch.tensor(fraction), 16)) == zeros
    torch.manual_seed(0)
    model = Samba(CFG)
    perturb_(model)
    model.set_sparsity_target(fraction)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    for training in (False, True):  # a number (evaluation, decoding) or a device tensor (training)
        model.train(training)
        with torch.no_grad():
            for c in model.chunk_outputs(ids):
                assert torch.equal((c == 0).sum(-1), torch.full((2, 9), zeros)), (training, fraction)
