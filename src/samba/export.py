"""Export a Samba model to a transformers ``MambaForCausalLM`` directory.

    python -m samba.export MODEL_DIR OUT_DIR [--drop-sparsity] [--data data/tokenized] [--force]

OUT_DIR holds what transformers reads (``config.json``, ``model.safetensors``, and the
tokenizer files when the model recorded its tokenizer), so ``MambaForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it, and its logits are Samba's main head. Beside
them, ``samba.json`` (Samba's config) and ``readout.safetensors`` (the readout head), so that
``Samba.from_pretrained(OUT_DIR)`` gives the whole Samba model back.

Plain Mamba cannot zero the chunk outputs: a model with ``sparsity_target`` > 0 is refused, from
its config alone (no weights read), unless ``--drop-sparsity``. Then OUT_DIR holds the dense model
whichever way it is read: ``samba.json`` says ``sparsity_target: 0.0`` and keeps the dropped target
and what dropping it cost (test ppl with and without, measured with a progress bar when the
tokenized data is at hand) under ``dropped_sparsity``.

OUT_DIR must not exist, or hold an earlier export and ``--force`` be given: exactly the files an
export writes (``EXPORT_FILES``, and ``TOKENIZER_FILES`` or not) or nothing at all. Anything else
is refused, whatever the flags, and the source model is never written to.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError
from .data import TOKENIZER_FILE
from .errors import UserError
from .io import atomic_dir
from .model import Samba
from .model_files import (CONFIG_FILE, EXPORT_CONFIG_FILE, READOUT_FILE, WEIGHTS_FILE, CheckpointError,
                          backbone_key_map, local_model_config, read_export_config, require_model_dir)
from .ops import kernels

logger = logging.getLogger(__name__)

# What an export writes, and so all that --force may replace: the four files of every export, and
# the tokenizer's (PreTrainedTokenizerFast.save_pretrained) when the model recorded one.
EXPORT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, READOUT_FILE, EXPORT_CONFIG_FILE})
TOKENIZER_FILES = frozenset({TOKENIZER_FILE, "tokenizer_config.json"})
COST_WINDOWS = 64  # test windows of 512 tokens over which dropping the sparsity is measured


class ExportError(UserError, ValueError):
    """The model computes something plain Mamba cannot represent, or OUT_DIR may not be written."""


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


def sparsity_cost(model: Samba, data_dir: Path, seq_len: int = 512,
                  max_windows: int = COST_WINDOWS) -> dict[str, float]:
    """Test ppl of the main head with the model's sparsity and without it (first windows): the
    long part of an export on a CPU (minutes at the 130m size), each pass with a progress bar."""
    from .data import TokenWindows, load_split
    from .evaluate import evaluate_model

    tokens = load_split(data_dir, "test")
    windows = TokenWindows.from_numpy(tokens, max(1, min(seq_len, len(tokens) - 1)), torch.device("cpu"))
    target = model.config.sparsity_target
    # the mixer's path (the reference, on the CPU) is no news here
    with kernels.unannounced():
        with_sparsity, _ = evaluate_model(model, windows, 4, max_windows=max_windows, count_sparsity=False,
                                          desc="test ppl with the sparsity")
        model.set_sparsity_target(0.0)
        try:
            dense, _ = evaluate_model(model, windows, 4, max_windows=max_windows, count_sparsity=False,
                                      desc="test ppl without")
        finally:
            model.set_sparsity_target(target)
    return {"ppl_with_sparsity": with_sparsity["ppl"], "ppl_without": dense["ppl"],
            "windows": with_sparsity["windows"]}


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def describe_out_dir(directory: Path) -> tuple[bool, str]:
    """Whether an existing ``directory`` may be replaced by ``--force``, and what it is: an
    earlier export (the four ``EXPORT_FILES``, ``samba.json`` an export's config, and the
    ``TOKENIZER_FILES`` or not, all plain files, nothing else) or an empty directory may."""
    if directory.is_symlink() or not directory.is_dir():
        return False, "a symbolic link" if directory.is_symlink() else "a file"
    entries = sorted(directory.iterdir())
    if not entries:
        return True, "empty"
    foreign = [p.name + (" (a link)" if p.is_symlink() else "/" if p.is_dir() else "") for p in entries
               if p.name not in EXPORT_FILES | TOKENIZER_FILES or p.is_symlink() or not p.is_file()]
    if foreign:
        return False, f"it holds {_names(foreign)}, which export does not write"
    missing = sorted(EXPORT_FILES - {p.name for p in entries})
    if missing:
        return False, f"it has no {_names(missing)}"
    try:
        read_export_config(directory)
    except (CheckpointError, ConfigError, OSError):
        return False, f"its {EXPORT_CONFIG_FILE} is not an export's"
    return True, "an earlier export"


def check_out_dir(out_dir: Path, model_dir: Path, force: bool) -> None:
    """Refuse an ``out_dir`` that is, or lies inside, the source model, and an existing one
    unless it is an earlier export (or empty) and ``force``: before any work."""
    source, out = model_dir.resolve(), out_dir.resolve()
    if out == source or source in out.parents:
        where = "is the source model" if out == source else f"lies inside the source model {model_dir}"
        raise ExportError(f"{out_dir} {where}; export to a folder outside it")
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    replaceable, what = describe_out_dir(out_dir)
    if not replaceable:
        raise ExportError(f"{out_dir} exists and is not an earlier export ({what}); --force replaces only an "
                          "earlier export: export to another folder")
    if not force:
        raise ExportError(f"{out_dir} exists already ({what}); pass --force to replace it")


def _has_test_split(data_dir: Path | None) -> bool:
    return data_dir is not None and (data_dir / "test.bin").is_file()


def _no_test_split(data_dir: Path | None) -> str:
    return "none was given" if data_dir is None else f"{data_dir} has no test.bin"


def sparsity_refusal(model_dir: Path, target: float, data_dir: Path | None) -> str:
    """Why a sparse model is not exported, and how to see what exporting it dense costs."""
    if _has_test_split(data_dir):
        cost = (f"which measures what that costs (test ppl with and without on {data_dir}: minutes on a CPU, "
                f"shown with a progress bar), prints it and records it in {EXPORT_CONFIG_FILE}")
    else:
        cost = (f"which, given --data naming tokenized data ({_no_test_split(data_dir)}), also measures and prints "
                "what that costs in test ppl")
    return (f"{model_dir} zeroes {target:.0%} of every chunk output (model.sparsity_target {target}), which "
            f"plain Mamba cannot compute; pass --drop-sparsity to export the dense model instead, {cost}")


def export(model_dir: str | Path, out_dir: str | Path, drop_sparsity: bool = False,
           data_dir: str | Path | None = None, force: bool = False) -> dict:
    """Write ``out_dir``, replacing an existing one (only an earlier export, and only if
    ``force``) once the new one is complete. Everything refused is refused before the weights
    are read. Returns what was written and measured."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else None
    # 1. refusals, from the source's config and OUT_DIR's listing alone (seconds)
    require_model_dir(model_dir, "train")
    target = local_model_config(model_dir).sparsity_target
    if target > 0 and not drop_sparsity:
        raise ExportError(sparsity_refusal(model_dir, target, data_dir))
    check_out_dir(out_dir, model_dir, force)
    # 2. the model, dense; what dropping its sparsity costs (the long part)
    model = Samba.from_pretrained(model_dir, backend="reference").eval()
    report: dict = {}
    dropped: dict = {}
    if target > 0:
        dropped["sparsity_target"] = target
        if _has_test_split(data_dir):
            logger.info("measuring what dropping the sparsity costs, on %s", data_dir)
            dropped.update(sparsity_cost(model, data_dir))
        cost = (f": test ppl {dropped['ppl_with_sparsity']:.3f} with it, {dropped['ppl_without']:.3f} without, "
                f"on the first {dropped['windows']} windows" if "ppl_without" in dropped
                else f" (what that costs is not measured: {_no_test_split(data_dir)})")
        logger.warning("dropping the chunk-output sparsity (%s)%s", target, cost)
        model.set_sparsity_target(0.0)  # what every reader of OUT_DIR gets: Samba, samba.generate, transformers
        report["dropped_sparsity"] = dropped
    report["sparsity_target"] = model.config.sparsity_target
    # 3. OUT_DIR, whole or not at all
    hf_config = transformers_config(model)
    samba_json = {"model": model.config.to_dict(), **({"dropped_sparsity": dropped} if dropped else {})}
    with atomic_dir(out_dir) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(backbone_state(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        readout = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith("readout.")}
        save_file(readout, tmp / READOUT_FILE, metadata={"format": "pt"})
        (tmp / EXPORT_CONFIG_FILE).write_text(json.dumps(samba_json, indent=2) + "\n")
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
                        help="tokenized data, on which --drop-sparsity measures what it costs (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR if it holds an earlier export (and nothing else)")
    args = parser.parse_args(argv)
    report = export(args.model_dir, args.out_dir, args.drop_sparsity, args.data, force=args.force)
    print(f"wrote {args.out_dir}: {json.dumps(report)}")


if __name__ == "__main__":
    # Run the package's copy of this module (samba.export), not __main__'s: the errors the
    # command line turns into one line are the package's classes.
    from samba.cli import run_stage
    from samba.export import main as package_main

    run_stage("export", package_main)
