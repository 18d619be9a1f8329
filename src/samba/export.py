"""Export a Samba model to a transformers ``MambaForCausalLM`` directory.

    python -m samba.export MODEL_DIR OUT_DIR [--drop-sparsity] [--data data/tokenized] [--force]

OUT_DIR holds what transformers reads (``config.json``, ``model.safetensors``, and the
tokenizer files when the model recorded its tokenizer), so ``MambaForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it, and its logits are Samba's main head. Beside
them, ``samba.json`` (Samba's config) and ``readout.safetensors`` (the readout head), so that
``Samba.from_pretrained(OUT_DIR)`` gives the whole Samba model back.

Plain Mamba cannot zero the chunk outputs: a model with ``sparsity_target`` > 0 is refused
unless ``--drop-sparsity``, and the cost of dropping it (test ppl with and without) is measured
when the tokenized data is at hand.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .data import TOKENIZER_FILE
from .errors import UserError
from .io import atomic_dir
from .model import Samba
from .model_files import EXPORT_CONFIG_FILE, READOUT_FILE, WEIGHTS_FILE, backbone_key_map, require_model_dir
from .ops import kernels

logger = logging.getLogger(__name__)


class ExportError(UserError, ValueError):
    """The model computes something plain Mamba cannot represent, or the output exists already."""


def transformers_config(model: Samba):
    from transformers import MambaConfig

    c = model.config
    return MambaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                       state_size=c.d_state, conv_kernel=c.d_conv, expand=c.expand_factor,
                       intermediate_size=c.d_inner, time_step_rank=c.dt_rank, layer_norm_epsilon=c.norm_eps,
                       use_bias=False, use_conv_bias=True, residual_in_fp32=True, tie_word_embeddings=True)


def backbone_state(model: Samba) -> dict[str, torch.Tensor]:
    """The backbone's tensors under transformers' names (the tied head is not repeated)."""
    state = model.state_dict()
    return {src: state[ours].detach().float().contiguous().cpu()
            for ours, src in backbone_key_map(model.config, "transformers").items()}


def to_transformers(model: Samba):
    """A ``MambaForCausalLM`` holding this model's backbone (fp32, CPU): Samba's main head
    without chunk-output sparsity."""
    from transformers import MambaForCausalLM

    hf = MambaForCausalLM(transformers_config(model))
    state = backbone_state(model)
    state["lm_head.weight"] = state["backbone.embeddings.weight"]
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def sparsity_cost(model: Samba, data_dir: Path, seq_len: int = 512, max_windows: int = 64) -> dict[str, float]:
    """Test ppl of the main head with the model's sparsity and without it (first windows)."""
    from .data import TokenWindows, load_split
    from .evaluate import evaluate_model

    tokens = load_split(data_dir, "test")
    windows = TokenWindows.from_numpy(tokens, max(1, min(seq_len, len(tokens) - 1)), torch.device("cpu"))
    target = model.config.sparsity_target
    # the mixer's path (the reference, on the CPU) is no news here, and a refusal may follow in one line
    with kernels.unannounced():
        with_sparsity, _ = evaluate_model(model, windows, 4, max_windows=max_windows, count_sparsity=False, desc=None)
        model.set_sparsity_target(0.0)
        try:
            dense, _ = evaluate_model(model, windows, 4, max_windows=max_windows, count_sparsity=False, desc=None)
        finally:
            model.set_sparsity_target(target)
    return {"ppl_with_sparsity": with_sparsity["ppl"], "ppl_without": dense["ppl"],
            "windows": with_sparsity["windows"]}


def export(model_dir: str | Path, out_dir: str | Path, drop_sparsity: bool = False,
           data_dir: str | Path | None = None, force: bool = False) -> dict:
    """Write ``out_dir``; an existing one is refused unless ``force``, and then replaced only
    when the new one is complete. Returns what was written and measured."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_model_dir(model_dir, "train")
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} exists already; pass --force to replace it")
    model = Samba.from_pretrained(model_dir, backend="reference").eval()
    report: dict = {"sparsity_target": model.config.sparsity_target}
    if model.config.sparsity_target > 0:
        if data_dir is not None and (Path(data_dir) / "test.bin").is_file():
            report.update(sparsity_cost(model, Path(data_dir)))
        cost = (f" (test ppl {report['ppl_with_sparsity']:.3f} with it, {report['ppl_without']:.3f} without, on "
                f"the first {report['windows']} windows)") if "ppl_without" in report else ""
        if not drop_sparsity:
            raise ExportError(
                f"{model_dir} zeroes {model.config.sparsity_target:.0%} of every chunk output "
                f"(model.sparsity_target), which plain Mamba cannot compute{cost}; pass --drop-sparsity "
                "to export the dense model anyway")
        logger.warning("dropping the chunk-output sparsity (%s)%s", model.config.sparsity_target, cost)
    hf_config = transformers_config(model)
    with atomic_dir(out_dir) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(backbone_state(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        readout = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith("readout.")}
        save_file(readout, tmp / READOUT_FILE, metadata={"format": "pt"})
        (tmp / EXPORT_CONFIG_FILE).write_text(json.dumps({"model": model.config.to_dict()}, indent=2) + "\n")
        tokenizer = model_dir / TOKENIZER_FILE
        if tokenizer.is_file():
            from transformers import PreTrainedTokenizerFast

            PreTrainedTokenizerFast(tokenizer_file=str(tokenizer)).save_pretrained(tmp)
            report["tokenizer"] = True
    report["out"] = str(out_dir)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samba.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a Samba model directory (what the train stage writes)")
    parser.add_argument("out_dir", help="where to write the transformers directory")
    parser.add_argument("--drop-sparsity", action="store_true",
                        help="export a model trained with model.sparsity_target > 0 without its sparsity")
    parser.add_argument("--data", default="data/tokenized",
                        help="tokenized data, to measure what dropping the sparsity costs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    report = export(args.model_dir, args.out_dir, args.drop_sparsity, args.data, force=args.force)
    print(f"wrote {args.out_dir}: {json.dumps(report)}")


if __name__ == "__main__":
    # Run the package's copy of this module (samba.export), not __main__'s: the errors the
    # command line turns into one line are the package's classes.
    from samba.cli import run_stage
    from samba.export import main as package_main

    run_stage("export", package_main)
