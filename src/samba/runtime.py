"""Device, precision and seeding, from the ``compute:`` and ``training:`` sections."""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from .config import ComputeConfig, ConfigError

logger = logging.getLogger(__name__)


def resolve_device(compute: ComputeConfig) -> torch.device:
    if compute.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(compute.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("compute.device: CUDA was asked for but torch sees no GPU "
                              "(set compute.device: auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"compute.device: {compute.device} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
    return device


def autocast_dtype(compute: ComputeConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype, or None for plain fp32."""
    if compute.precision == "fp32" or (compute.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{device} ({name}), {'bf16 autocast' if dtype is not None else 'fp32'}"
