"""Build the model that training starts from: remapped pretrained weights, or a seeded
random initialisation; checked before it is written.

The source (``pretrained.model_name``) is a Mamba checkpoint (transformers or mamba-ssm format)
or a Samba directory (what the train stage writes: a stand-in pretrained model, readout
included). The written model is the baseline: dense, whatever ``model.sparsity_target`` says
(the train stage applies the target; a Samba source's own target is dropped). It is reloaded
and its main-head logits are compared with those of transformers' own ``MambaForCausalLM``
holding the source's backbone weights (fp32, CPU); nothing is written unless they agree.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from .config import Params
from .errors import UserError
from .io import atomic_dir
from .model import Samba
from .model_files import SAMBA_FORMAT, checkpoint_model_config, model_from_weights, read_weights, resolve_checkpoint_dir
from .ops import kernels
from .runtime import seed_everything

logger = logging.getLogger(__name__)
CHECK_SHAPE = (2, 64)  # token ids compared between source and converted model
CHECK_TOLERANCE = 1e-4  # relative error of logits, fp32
# Why the models built here take the plain-PyTorch path whatever compute.backend says (the log says it)
REFERENCE_WHY = ("convert checks the written model's logits on it, whatever compute.backend says: the check "
                 "is of the weights, which are the same on either path, and this path is independent of the "
                 "mamba-ssm kernels that transformers' MambaForCausalLM calls on the GPU")


class ConversionError(UserError, RuntimeError):
    """The converted model does not compute what its source computes."""


def transformers_reference(directory: Path, fmt: str, weights, model: Samba) -> torch.nn.Module:
    """The source checkpoint in transformers' MambaForCausalLM, independent of our remapping:
    transformers reads its own format from disk itself; mamba-ssm's tensors (``weights``) are
    loaded into it with only the embedding key renamed, by transformers' strict state-dict check;
    a Samba source (no remapping) is ``model``'s backbone exported to it."""
    from transformers import MambaForCausalLM

    from .export import to_transformers, transformers_config

    if fmt == SAMBA_FORMAT:
        return to_transformers(model)
    if fmt == "transformers":
        return MambaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf = MambaForCausalLM(transformers_config(model))
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v.float() for k, v in weights.items()}
    state.setdefault("lm_head.weight", state["backbone.embeddings.weight"])
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def check_device() -> torch.device:
    """Where the written model is compared with its source (fp32). transformers' Mamba calls
    causal-conv1d and mamba-ssm whenever they are installed, whatever the tensors' device (on CPU
    tensors: "Expected x.is_cuda() to be true"), so where they are installed the comparison runs
    on the GPU, on their kernels; elsewhere on the CPU, on transformers' PyTorch path."""
    if kernels.kernels_available() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def convert(params: Params, out_dir: str | Path) -> dict:
    """Write ``out_dir`` (Samba format). Returns what was checked."""
    seed_everything(params.training.seed)
    pre = params.pretrained
    # the architecture; the baseline is dense, so sparsity_target is not the checkpoint's business
    model_overrides = {k: v for k, v in params.model.to_dict().items() if k != "sparsity_target"}
    with kernels.reference_forced_by(REFERENCE_WHY), atomic_dir(out_dir) as tmp:
        if pre.use_pretrained:
            source = resolve_checkpoint_dir(pre.model_name)
            fmt, config = checkpoint_model_config(source, **model_overrides)
            weights = read_weights(source)  # read once, for both the model and the reference
            model = model_from_weights(Samba, fmt, config, weights, backend="reference", where=str(source))
            if model.config.sparsity_target:
                logger.info("the source zeroes %.0f%% of each chunk output; the baseline written here is dense",
                            100 * model.config.sparsity_target)
                model.set_sparsity_target(0.0)
            reference = transformers_reference(source, fmt, weights, model)
            logger.info("remapped %s (%s format) into %d chunks of %d layers", pre.model_name, fmt,
                        model.config.n_chunks, model.config.readout_stride)
        else:
            model = Samba(dataclasses.replace(params.model, sparsity_target=0.0), backend="reference")
            reference, fmt = model.eval(), "random"
            logger.info("random initialisation, seed %d", params.training.seed)
        model.save_pretrained(tmp)
        written = Samba.from_pretrained(tmp, backend="reference").eval()
        ids = torch.randint(0, params.model.vocab_size, CHECK_SHAPE,
                            generator=torch.Generator().manual_seed(params.training.seed))
        device = check_device()
        with torch.no_grad():
            expected = reference.to(device)(ids.to(device)).logits
            got = written.to(device)(ids.to(device)).logits
        error = relative_error(got, expected)
        logger.info("logits of the written model vs %s: relative error %.2e",
                    "transformers' MambaForCausalLM" if pre.use_pretrained else "the model in memory", error)
        if not error < CHECK_TOLERANCE:
            raise ConversionError(f"converted logits differ from the source's: relative error {error:.3e} "
                                  f">= {CHECK_TOLERANCE}; nothing written")
    n_params = sum(p.numel() for p in written.parameters())
    return {"source": pre.model_name if pre.use_pretrained else "random", "format": fmt,
            "logits_relative_error": error, "parameters": n_params}
