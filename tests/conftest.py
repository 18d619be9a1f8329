"""Shared fixtures: tiny random Mamba checkpoints in the Hub's formats, made on the spot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from samba.convert import relative_error  # noqa: F401  (re-exported for the tests)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tiny Mamba: 4 layers so that stride 2 gives 2 chunks; vocab not a power of two.
TINY = dict(vocab_size=96, hidden_size=16, num_hidden_layers=4, state_size=4, expand=2,
            conv_kernel=4, layer_norm_epsilon=1e-5)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its initial value (ones, zeros, aranges) so tests see real numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def make_transformers_mamba(seed: int = 0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**{**TINY, **overrides}))
    perturb_(model, seed)
    return model.eval()


def save_as_mamba_ssm(hf_model, directory: Path) -> Path:
    """The same weights in mamba-ssm's original layout: config.json + pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config
    state = {}
    for key, value in hf_model.state_dict().items():
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as torch.save keeps it
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size, "ssm_cfg": {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
                                                  "expand": cfg.expand},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    return directory


@pytest.fixture(scope="session")
def hf_mamba():
    return make_transformers_mamba()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, hf_mamba) -> Path:
    directory = tmp_path_factory.mktemp("hf_mamba")
    hf_mamba.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mamba_ssm_checkpoint(tmp_path_factory, hf_mamba) -> Path:
    return save_as_mamba_ssm(hf_mamba, tmp_path_factory.mktemp("mamba_ssm") / "ckpt")

