"""Typed configuration: one dataclass per section of ``params.yaml``.

Every value of an experiment lives in ``params.yaml``; these classes mirror it. Building one
from a mapping (``from_dict``) refuses unknown keys, missing keys, wrong types and impossible
values, always naming the offending key (``training.lr``), so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# A decimal number as researchers and DVC write it: 5e-05, 1E-4, 3.0e-4, .5, -2. Not what
# float() alone also takes (nan, inf, 1_000, surrounding spaces): those stay strings, refused.
FLOAT_LITERAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def float_literal(value: Any) -> Any:
    """A string that is exactly a FLOAT_LITERAL as that float (YAML 1.1 reads 5e-05, no dot, as
    DVC's -S writes 5e-5, as a string); any other value as it is."""
    return float(value) if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value) else value


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range
        return math.inf


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` if it matches ``annotation`` (int, float, str, bool, Literal, Optional)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, options[0])
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        number = float_literal(value)
        if isinstance(number, str):
            raise ConfigError(f"{key}: must be a number, got the string {value!r}")
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(number := _to_float(number)):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
        return value
    if origin is tuple:  # tuple[X, ...]: a YAML list of X
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r} ({type(value).__name__})")
        item = typing.get_args(annotation)[0]
        return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _unknown_keys_message(unknown: list, known: list[str], prefix: str, where: str) -> str:
    """'unknown key(s) training.pruning_weigth; did you mean training.pruning_weight? known keys
    of training: [...]': the nearest known key (difflib) first, then all of them."""
    def full(k) -> str:
        return f"{prefix}.{k}" if prefix else str(k)

    guesses = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
    guesses = {k: g[0] for k, g in guesses.items() if g}
    if len(unknown) == 1 and guesses:
        hint = f"did you mean {full(guesses[unknown[0]])}? "
    elif guesses:
        hint = "did you mean " + ", ".join(f"{full(g)} for {full(k)}" for k, g in guesses.items()) + "? "
    else:
        hint = ""
    return f"unknown key(s) {', '.join(map(full, unknown))}; {hint}known keys of {where}: {known}"


class Section:
    """Mixin: build a dataclass from a mapping, strictly."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = "", require_all: bool = False):
        """Build from ``data``; with ``require_all`` a key left out is an error, not a default."""
        where = prefix or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a mapping of keys to values, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown, sorted(fields), prefix, where))
        kwargs = {}
        for name, f in fields.items():
            key = f"{prefix}.{name}" if prefix else name
            if name not in data:
                if require_all or (f.default is dataclasses.MISSING
                                   and f.default_factory is dataclasses.MISSING):
                    raise ConfigError(f"{key}: missing")
                continue
            annotation = hints[name]
            if isinstance(annotation, type) and issubclass(annotation, Section):
                kwargs[name] = annotation.from_dict(data[name], key, require_all)
            else:
                kwargs[name] = _check_type(key, data[name], annotation)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten(data: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"training.lr": ..., ...}: keys as params.yaml and DVC name them."""
    out: dict[str, Any] = {}
    for k, v in (data or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Architecture of a Samba model (the ``model:`` section)."""

    vocab_size: int = 50280
    d_model: int = 768
    n_layers: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand_factor: int = 2
    readout_hidden_dim: int = 512
    readout_stride: int = 4
    norm_eps: float = 1e-5
    # Fraction of each token's d_model vector set to exactly 0 in every chunk output, by
    # magnitude (see sparsity.py). Part of the model: saved, loaded and applied at inference.
    sparsity_target: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand_factor",
                     "readout_hidden_dim", "readout_stride"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     name, f"must be a positive integer, got {value!r}")
        _require(self.n_layers % self.readout_stride == 0, "n_layers",
                 f"{self.n_layers} is not divisible by readout_stride={self.readout_stride}")
        _require(0 < self.norm_eps < 1, "norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        _require(0 <= self.sparsity_target < 1, "sparsity_target",
                 f"must be in [0, 1) (the fraction of each vector set to 0), got {self.sparsity_target}")
        n_zero = round(self.sparsity_target * self.d_model)  # sparsity.zero_count
        _require(n_zero < self.d_model, "sparsity_target",
                 f"{self.sparsity_target} of d_model={self.d_model} rounds to {n_zero}: every entry would be 0")

    @property
    def d_inner(self) -> int:
        return self.expand_factor * self.d_model

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.d_model / 16)

    @property
    def n_chunks(self) -> int:
        return self.n_layers // self.readout_stride


@dataclass(frozen=True)
class DatasetConfig(Section):
    """Where the text and the tokenizer come from: Hub ids or local paths."""

    name: str = "wikitext"
    config_name: str = "wikitext-2-raw-v1"
    tokenizer: str = "EleutherAI/gpt-neox-20b"
    # [start, end): the part of the train split to keep, as fractions of its tokens, cut at
    # article boundaries (data.cut_articles); validation and test are never cut.
    train_range: tuple[float, ...] = (0.0, 1.0)

    def __post_init__(self):
        _require(len(self.train_range) == 2, "train_range",
                 f"must be [start, end], two fractions, got {list(self.train_range)}")
        start, end = self.train_range
        _require(0 <= start < end <= 1, "train_range",
                 f"must be [start, end] with 0 <= start < end <= 1, got {list(self.train_range)}")


@dataclass(frozen=True)
class PretrainedConfig(Section):
    use_pretrained: bool = True
    model_name: str = "state-spaces/mamba-130m-hf"
    freeze_backbone: bool = False


@dataclass(frozen=True)
class TrainingConfig(Section):
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 512
    epochs: int = 3
    max_steps: int = 0  # 0: no cap, ``epochs`` decides
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    readout_weight: float = 0.5
    pruning_weight: float = 0.0
    pruning_penalty: typing.Literal["l1", "hoyer"] = "hoyer"  # see sparsity.PENALTIES; the seed's: l1 at 0.05
    sparsity_warmup_steps: int = 100  # model.sparsity_target is reached linearly over these steps
    # > 0: the ramp lasts this fraction of the run's steps instead (sparsity_warmup_steps must be 0)
    sparsity_warmup_fraction: float = 0.0
    # Distillation (distill.py): KL(teacher || student) of the main heads, per token, in nats.
    distill_weight: float = 0.0
    teacher: str = "models/init"  # a model directory; models/init is the converted baseline
    keep: typing.Literal["last", "best"] = "last"  # best: lowest validation ppl after the warm-up
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "epochs", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "seed", "sparsity_warmup_steps"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "readout_weight", "pruning_weight", "distill_weight"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 <= self.sparsity_warmup_fraction <= 1, "sparsity_warmup_fraction",
                 f"must be in [0, 1] (a fraction of the run's steps), got {self.sparsity_warmup_fraction}")
        _require(not (self.sparsity_warmup_fraction > 0 and self.sparsity_warmup_steps > 0), "sparsity_warmup_fraction",
                 f"is {self.sparsity_warmup_fraction} while sparsity_warmup_steps is {self.sparsity_warmup_steps}: "
                 "the ramp is one or the other; set training.sparsity_warmup_steps=0 to ramp over a fraction")

    def sparsity_ramp_steps(self, total_steps: int) -> int:
        """The steps over which model.sparsity_target is reached, in a run of ``total_steps``."""
        if self.sparsity_warmup_fraction > 0:
            return round(self.sparsity_warmup_fraction * total_steps)
        return self.sparsity_warmup_steps


@dataclass(frozen=True)
class ComputeConfig(Section):
    """Where and how models run; shared by convert, train and evaluate."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: typing.Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    backend: typing.Literal["auto", "kernels", "reference"] = "auto"
    compile: bool = True  # on CUDA only: torch.compile the non-kernel parts of the training step
    cuda_graphs: bool = True  # on CUDA: the training step (and evaluation) replayed as CUDA graphs
    num_processes: int = 1  # data-parallel processes of the train stage (torchrun + DDP)

    def __post_init__(self):
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _require(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")


@dataclass(frozen=True)
class EvalConfig(Section):
    batch_size: int = 32
    max_windows: int = 0  # 0: every window of the test split
    near_zero_eps: float = 1e-2
    near_zero_rel: float = 1e-2
    histogram_bins: int = 80
    max_ppl_increase: float = 0.0  # >0: fail evaluate when ppl > baseline * (1 + this)
    # ppl when the smallest fraction f of each chunk-output vector is zeroed at inference
    prune_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9)
    # the bases the prune curve zeroes in: native (prune_curve), pca (prune_curve_pca: each chunk's
    # principal axes, from the evaluated model's outputs on pca_windows validation windows)
    prune_basis: tuple[typing.Literal["native", "pca"], ...] = ("native",)
    pca_windows: int = 32

    def __post_init__(self):
        _require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.max_windows >= 0, "max_windows", f"must be >= 0, got {self.max_windows}")
        _require(self.near_zero_eps > 0, "near_zero_eps", f"must be > 0, got {self.near_zero_eps}")
        _require(self.near_zero_rel > 0, "near_zero_rel", f"must be > 0, got {self.near_zero_rel}")
        _require(self.histogram_bins >= 2, "histogram_bins", f"must be >= 2, got {self.histogram_bins}")
        _require(self.max_ppl_increase >= 0, "max_ppl_increase",
                 f"must be >= 0, got {self.max_ppl_increase}")
        _require(len(self.prune_fractions) > 0, "prune_fractions",
                 "must list at least one fraction ([0.0]: none pruned)")
        for i, f in enumerate(self.prune_fractions):
            _require(0 <= f < 1, f"prune_fractions[{i}]", f"must be in [0, 1), got {f}")
        _require(len(self.prune_basis) > 0 and len(set(self.prune_basis)) == len(self.prune_basis), "prune_basis",
                 f"must list native and/or pca, each once, got {list(self.prune_basis)}")
        _require(self.pca_windows > 0, "pca_windows", f"must be > 0, got {self.pca_windows}")


@dataclass(frozen=True)
class LoggingConfig(Section):
    use_wandb: bool = False
    project_name: str = "samba"


@dataclass(frozen=True)
class Params(Section):
    """The whole of ``params.yaml``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a quote of the text) as one line that still says
    where and what: 'at line 2, column 6: expected ',' or ']', but got ':' (while parsing a flow
    sequence started at line 1, column 11)'. Lines and columns count from 1, as editors do."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    if not isinstance(err, yaml.MarkedYAMLError) or err.problem is None:
        return ": " + " ".join(str(err).split())
    where = f"at {at(err.problem_mark)}: " if err.problem_mark is not None else ": "
    context = ""
    if err.context:
        started = f" started at {at(err.context_mark)}" if err.context_mark is not None else ""
        context = f" ({err.context}{started})"
    return where + " ".join(err.problem.split()) + context


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check ``params.yaml``; every section must be present and every key known."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML {describe_yaml_error(err)}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: must hold a mapping of sections")
    sections = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(data) - set(sections), key=str)
    if unknown:  # before the missing ones: a misspelt section is both, and its name is the news
        raise ConfigError(_unknown_keys_message(unknown, sorted(sections), "", str(path)))
    missing = [name for name in sections if name not in data]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {missing}")
    return Params.from_dict(data, require_all=True)
