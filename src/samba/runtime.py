"""Device, precision and seeding, from the ``compute:`` and ``training:`` sections."""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from .config import ComputeConfig, ConfigError

logger = logging.getLogger(__name__)


def resolve_device(compute: ComputeConfig, local_rank: int | None = None) -> torch.device:
    """The device from ``compute.device``; under data parallelism each process takes the GPU
    of its ``local_rank``."""
    if compute.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        return device
    device = torch.device(compute.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("compute.device: CUDA was asked for but torch sees no GPU "
                              "(set compute.device: auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"compute.device: {compute.device} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    return device


def check_processes(compute: ComputeConfig) -> None:
    """``compute.num_processes`` must fit the device: on CUDA one GPU per process."""
    n = compute.num_processes
    if n > 1 and compute.device.startswith("cuda:"):
        raise ConfigError(f"compute.num_processes: {n} processes need one GPU each; "
                          f"compute.device: {compute.device} names a single GPU (use cuda or auto)")
    wants_cuda = compute.device.startswith("cuda") or (compute.device == "auto" and torch.cuda.is_available())
    if n > 1 and wants_cuda and n > torch.cuda.device_count():
        raise ConfigError(f"compute.num_processes: {n} but only {torch.cuda.device_count()} GPU(s) "
                          "are visible (one process per GPU)")


def autocast_dtype(compute: ComputeConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype, or None for plain fp32."""
    if compute.precision == "fp32" or (compute.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Mixed precision, or nothing for fp32. ``cache=False`` for code captured in a CUDA graph
    (autocast's cache of cast weights must not outlive the capture)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{device} ({name}), {'bf16 autocast' if dtype is not None else 'fp32'}"
