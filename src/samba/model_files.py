"""Reading and writing Samba models, and remapping pretrained Mamba checkpoints.

Three directory formats are read:

- ``samba``: written by ``Samba.save_pretrained``: ``config.json`` (``{"format": "samba",
  "model": {...}}``) and ``model.safetensors``.
- ``transformers``: ``MambaForCausalLM.save_pretrained`` (``config.json`` with
  ``model_type: mamba``, ``model.safetensors`` or ``pytorch_model.bin``); keys
  ``backbone.embeddings.weight``, ``backbone.layers.{i}.*``, ``backbone.norm_f.weight``.
- ``mamba_ssm``: ``MambaLMHeadModel.save_pretrained`` (``config.json`` with ``d_model``,
  ``n_layer``, ...; ``pytorch_model.bin``); keys ``backbone.embedding.weight``, ...
- an export (``samba.export``): a transformers directory plus ``samba.json`` (Samba's config)
  and ``readout.safetensors``: read back as the whole Samba model.

The model is built through the class passed in (``Samba.from_pretrained`` passes itself), so
this module never imports ``model``: imports go model -> model_files only.

A Mamba checkpoint's layer ``i`` becomes chunk ``i // stride``, layer ``i % stride``; the
readout has no pretrained weights and starts freshly initialised. Every weight the model
expects must be present with its exact shape, and nothing may be left over; a weight that is
missing, unexpected or mis-shaped is named by its key in the source file.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .errors import UserError
from .io import atomic_dir
from .paths import resolve_local_path, written_as_path

SAMBA_FORMAT = "samba"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_CONFIG_FILE = "samba.json"  # beside an exported transformers model: Samba's own config
READOUT_FILE = "readout.safetensors"  # beside an exported transformers model: the readout
MIXER_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read as, or does not fit, the model asked for."""


# ----------------------------------------------------------------------------- sources

def local_checkpoint_dir(name_or_path: str | Path) -> Path | None:
    """The local checkpoint directory ``name_or_path`` names; None for a Hub id. Refuses a
    path that is not a directory (cheap: nothing is read)."""
    path = resolve_local_path(str(name_or_path))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a checkpoint must be a directory, not a file")
    if written_as_path(str(name_or_path)):  # never a Hub id (those read org/name)
        raise CheckpointError(f"{path}: no such directory (a local checkpoint directory; a Hub id reads org/name)")
    return None


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local directory (a relative one read as ``paths.resolve_local_path`` says); anything
    else is taken for a Hub repo id and downloaded."""
    path = local_checkpoint_dir(name_or_path)
    if path is not None:
        return path
    from .hub import download_snapshot

    return download_snapshot(str(name_or_path), allow_patterns=[
        CONFIG_FILE, "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin"],
        what="model checkpoint")


def require_model_dir(path: str | Path, stage: str) -> None:
    """A stage's model input must exist locally (it is never a Hub id)."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no model there; run the {stage} stage first (dvc repro {stage})")


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a Samba or Mamba checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def detect_format(config: Mapping[str, Any], directory: Path) -> str:
    if config.get("format") == SAMBA_FORMAT:
        return SAMBA_FORMAT
    if "model_type" in config:
        if config["model_type"] != "mamba":
            raise CheckpointError(
                f"{directory}: model_type is {config['model_type']!r}; only Mamba-1 ('mamba') "
                "checkpoints can be remapped into Samba")
        return "transformers"
    if "d_model" in config and "n_layer" in config:
        return "mamba_ssm"
    raise CheckpointError(f"{directory}/{CONFIG_FILE}: neither a Samba config (format: samba), a "
                          "transformers Mamba config (model_type: mamba) nor a mamba-ssm config "
                          "(d_model, n_layer)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as err:  # a truncated or corrupt file: the header or data do not add up
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({str(err).splitlines()[0][:160]}); fetch it again") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, on the CPU. ``.bin`` only as plain tensors."""
    single = directory / WEIGHTS_FILE
    index = directory / "model.safetensors.index.json"
    pickle_file = directory / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(read_safetensors(directory / shard))
        return weights
    if pickle_file.is_file():
        try:
            state = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # code, not tensors
            raise CheckpointError(f"{pickle_file}: refused by torch.load(weights_only=True): "
                                  f"{str(err).splitlines()[0][:200]}") from None
        except Exception as err:
            raise CheckpointError(f"{pickle_file}: cannot be read as a PyTorch checkpoint, truncated or "
                                  f"corrupt ({str(err).splitlines()[0][:160]}); fetch it again") from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pickle_file}: expected a flat mapping of names to tensors")
        return dict(state)
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}, sharded safetensors or pytorch_model.bin")


# ----------------------------------------------------------------------------- configs

def _architecture_from_transformers(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    unsupported = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
                   "residual_in_fp32": True, "tie_word_embeddings": True}
    for key, wanted in unsupported.items():
        if key in cfg and cfg[key] != wanted:
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not supported (Samba needs {wanted!r})")
    d_model = cfg["hidden_size"]
    rank = cfg.get("time_step_rank", "auto")
    if rank != "auto" and rank != math.ceil(d_model / 16):
        raise CheckpointError(f"{where}: time_step_rank={rank} but Samba uses ceil(d_model/16)="
                              f"{math.ceil(d_model / 16)}")
    if cfg.get("intermediate_size", cfg.get("expand", 2) * d_model) != cfg.get("expand", 2) * d_model:
        raise CheckpointError(f"{where}: intermediate_size={cfg['intermediate_size']} is not expand*hidden_size")
    return {"vocab_size": cfg["vocab_size"], "d_model": d_model, "n_layers": cfg["num_hidden_layers"],
            "d_state": cfg.get("state_size", 16), "d_conv": cfg.get("conv_kernel", 4),
            "expand_factor": cfg.get("expand", 2), "norm_eps": cfg.get("layer_norm_epsilon", 1e-5)}


def _architecture_from_mamba_ssm(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    ssm = dict(cfg.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"{where}: ssm_cfg.layer={ssm['layer']!r}; only Mamba1 is supported")
    checks = {"attn_layer_idx": [], "d_intermediate": 0, "rms_norm": True, "tie_embeddings": True,
              "residual_in_fp32": True}
    for key, wanted in checks.items():
        if key in cfg and cfg[key] not in (wanted, None):
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not supported (Samba needs {wanted!r})")
    for key, wanted in {"bias": False, "conv_bias": True, "dt_rank": "auto"}.items():
        if key in ssm and ssm[key] != wanted:
            raise CheckpointError(f"{where}: ssm_cfg.{key}={ssm[key]!r} is not supported")
    pad = cfg.get("pad_vocab_size_multiple", 8)
    vocab = cfg["vocab_size"]
    vocab += (pad - vocab % pad) % pad  # mamba-ssm pads the embedding
    return {"vocab_size": vocab, "d_model": cfg["d_model"], "n_layers": cfg["n_layer"],
            "d_state": ssm.get("d_state", 16), "d_conv": ssm.get("d_conv", 4),
            "expand_factor": ssm.get("expand", 2), "norm_eps": cfg.get("norm_epsilon", 1e-5)}


def checkpoint_model_config(directory: Path, **overrides) -> tuple[str, ModelConfig]:
    """The checkpoint's format and the ModelConfig it implies, with ``overrides`` applied."""
    raw = read_config(directory)
    fmt = detect_format(raw, directory)
    where = str(directory / CONFIG_FILE)
    known = {f for f in ModelConfig.__dataclass_fields__}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown model setting(s) {unknown}; known: {sorted(known)}")
    try:
        if fmt == SAMBA_FORMAT:
            arch = dict(raw["model"])
        elif fmt == "transformers":
            arch = _architecture_from_transformers(raw, where)
        else:
            arch = _architecture_from_mamba_ssm(raw, where)
    except KeyError as err:
        raise CheckpointError(f"{where}: missing key {err}") from None
    # Everything the checkpoint states is fixed by its weights; a Mamba checkpoint says
    # nothing of the readout, so readout_stride and readout_hidden_dim stay free there.
    for key, value in overrides.items():
        if key in arch and arch[key] != value:
            raise CheckpointError(f"{key}: the checkpoint at {directory} has {key}={arch[key]!r}, "
                                  f"but {value!r} was asked for")
        arch[key] = value
    return fmt, ModelConfig.from_dict(arch, prefix="model")


# ----------------------------------------------------------------------------- remapping

def backbone_key_map(config: ModelConfig, fmt: str) -> dict[str, str]:
    """Samba backbone key -> the same tensor's key in a Mamba checkpoint of format ``fmt``."""
    embedding = "backbone.embeddings.weight" if fmt == "transformers" else "backbone.embedding.weight"
    out = {"embedding.weight": embedding, "norm_f.weight": "backbone.norm_f.weight"}
    for i in range(config.n_layers):
        c, j = divmod(i, config.readout_stride)
        out[f"chunks.{c}.layers.{j}.norm.weight"] = f"backbone.layers.{i}.norm.weight"
        for name in MIXER_PARAMS:
            out[f"chunks.{c}.layers.{j}.mixer.{name}"] = f"backbone.layers.{i}.mixer.{name}"
    return out


def remap_mamba_weights(weights: Mapping[str, torch.Tensor], fmt: str, config: ModelConfig,
                        expected: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Mamba checkpoint keys -> Samba backbone keys. Missing, unexpected and mis-shaped weights
    are refused, named by their keys in the checkpoint (``where``)."""
    key_map = backbone_key_map(config, fmt)
    known = set(key_map.values()) | {"lm_head.weight"}
    unexpected = [k for k in weights if k not in known]
    if unexpected:
        raise CheckpointError(f"unexpected weight(s) in {where}: {_names(unexpected)}")
    missing = [src for src in key_map.values() if src not in weights]
    if missing:
        raise CheckpointError(f"missing weight(s) in {where}: {_names(missing)}")
    wrong = [f"{src} {tuple(weights[src].shape)} (expected {tuple(expected[ours].shape)})"
             for ours, src in key_map.items() if weights[src].shape != expected[ours].shape]
    if wrong:
        raise CheckpointError(f"wrong shape for weight(s) in {where}: {'; '.join(wrong[:8])}")
    if "lm_head.weight" in weights and not torch.equal(weights["lm_head.weight"], weights[key_map["embedding.weight"]]):
        raise CheckpointError(f"lm_head.weight in {where} differs from the embedding: untied heads are not supported")
    return {ours: weights[src] for ours, src in key_map.items()}


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str,
                      skip_prefix: str | None = None) -> None:
    """Copy ``state`` (Samba's own keys, read from ``where``) into ``model``; every key must
    exist with the same shape, none missing. Keys under ``skip_prefix`` may be absent."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (skip_prefix and k.startswith(skip_prefix))]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"missing weight(s) in {where}: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"unexpected weight(s) in {where}: {_names(unexpected)}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"wrong shape for weight(s) in {where}: {'; '.join(wrong[:8])}")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- public

ModelClass = Callable[..., nn.Module]  # Samba: model_class(config, backend=backend)


def load_model(model_class: ModelClass, name_or_path: str | Path, backend: str = "auto",
               device: str | torch.device | None = None, **overrides) -> nn.Module:
    """See ``Samba.from_pretrained``."""
    directory = resolve_checkpoint_dir(name_or_path)
    if (directory / EXPORT_CONFIG_FILE).is_file():
        model = load_export(model_class, directory, backend)
    else:
        fmt, config = checkpoint_model_config(directory, **overrides)
        model = model_from_weights(model_class, fmt, config, read_weights(directory), backend,
                                   where=str(directory), device=device if fmt == SAMBA_FORMAT else None)
    return model.to(device) if device is not None else model


def read_export_config(directory: Path) -> ModelConfig:
    """The ModelConfig an export's ``samba.json`` holds under ``model``."""
    path = directory / EXPORT_CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())["model"], prefix="model")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a Samba export config ({err})") from None


def local_model_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a local model directory (Samba's, an export, a Mamba checkpoint), read
    from its config files alone: no weights are loaded."""
    if (directory / EXPORT_CONFIG_FILE).is_file():
        return read_export_config(directory)
    return checkpoint_model_config(directory)[1]


def load_export(model_class: ModelClass, directory: Path, backend: str = "auto") -> nn.Module:
    """A directory written by ``samba.export``: the transformers backbone, the readout beside."""
    config = read_export_config(directory)
    model = model_from_weights(model_class, "transformers", config, read_weights(directory), backend,
                               where=str(directory))
    readout = read_safetensors(directory / READOUT_FILE)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("readout.")}  # in already
    state.update({k: v.float() for k, v in readout.items()})
    load_state_strict(model, state, where=str(directory / READOUT_FILE))
    return model


def model_from_weights(model_class: ModelClass, fmt: str, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                       backend: str = "auto", where: str = "the checkpoint",
                       device: str | torch.device | None = None) -> nn.Module:
    """A ``model_class`` (Samba) holding a checkpoint's tensors (as ``read_weights`` returns them),
    built on ``device`` (the CPU by default: a Mamba checkpoint's readout keeps the CPU's random init)."""
    with torch.device(device if device is not None else "cpu"):
        model = model_class(config, backend=backend)
    if fmt == SAMBA_FORMAT:
        load_state_strict(model, {k: v.float() for k, v in weights.items()}, where)
    else:
        state = remap_mamba_weights(weights, fmt, config, model.state_dict(), where)
        load_state_strict(model, {k: v.float() for k, v in state.items()}, where, skip_prefix="readout.")
    return model


def save_model(model: nn.Module, path: str | Path, extra_files: Mapping[str, Path] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ ``extra_files``, name -> source file);
    an existing directory is replaced only once the new one is complete, so a failure never
    leaves a half-written model."""
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"format": SAMBA_FORMAT, "model": model.config.to_dict()}, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
