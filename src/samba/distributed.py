"""Data parallelism for the train stage: torchrun processes and DistributedDataParallel.

``compute.num_processes`` processes train one model: NCCL between GPUs, gloo on the CPU. The
global batch stays ``training.batch_size``: each step's windows (the same order as one
process would take) are split evenly over the ranks, DDP averages the gradients, so N
processes follow one process's trajectory. Rank 0 alone validates, logs and writes.

Two ways in:
- ``dvc repro`` runs ``python stages/train.py`` plainly; with ``num_processes`` > 1 the stage
  starts the processes on this host itself (``launch``: ``torch.distributed.run --standalone``).
- By hand, over several hosts, torchrun starts the stage on each (docs/gpu.md: "Several GPUs");
  the stage sees torchrun's environment (``under_launcher``) and is one of the ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LAUNCHED_ENV = "SAMBA_LAUNCHED_BY_STAGE"  # set for the processes ``launch`` starts
# NVLink multicast stays off (it can take a shared host's GPUs out of service); set here so
# that a launcher building its own environment keeps it too.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies, so that ``kill -9`` of
    the stage takes torchrun and every worker with it (torchrun starts workers in sessions of
    their own, out of reach of a process-group kill). Elsewhere: nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def under_launcher() -> bool:
    """Started by torchrun (it sets these for every process it starts)?"""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def context_from_env() -> Context:
    if not under_launcher():
        return Context()
    return Context(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                   local_rank=int(os.environ["LOCAL_RANK"]))


def init(ctx: Context, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA devices, gloo for the CPU."""
    if not ctx.distributed or dist.is_initialized():
        return
    if os.environ.get(LAUNCHED_ENV):
        die_with_parent()
    for key, value in SAFE_NCCL_ENV.items():
        os.environ.setdefault(key, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # CUDA graphs capture NCCL calls; PyTorch's async error handling must be off for that
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    logger.info("rank %d of %d on %s", ctx.rank, ctx.world_size, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Summed in place across ranks (nothing with one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class HostFlags:
    """Agree on a yes/no across ranks without touching the GPU: a CPU all-reduce over gloo
    (a second, gloo group when the main one is NCCL), so that the step loop never waits on
    the device to decide whether to stop."""

    def __init__(self):
        self.group = None
        if dist.is_initialized():
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        if not dist.is_initialized():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


def check_world_size(num_processes: int) -> None:
    """Under torchrun, params.yaml must describe the run: compute.num_processes = its world size."""
    from .config import ConfigError

    world = context_from_env().world_size
    if world != num_processes:
        raise ConfigError(f"compute.num_processes: {num_processes} but torchrun started {world} processes; set it "
                          "to nnodes x nproc-per-node, so that params.yaml records the run")


def shard(batch_windows: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's share of one step's window indices (contiguous, equal shares)."""
    per_rank = batch_windows.shape[0] // ctx.world_size
    return batch_windows[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]


def launch(num_processes: int, script: str, argv: list[str]) -> int:
    """Run ``script argv`` in ``num_processes`` processes on this host (torchrun --standalone)
    and return the exit code. Ctrl-C reaches the processes, which stop after a checkpoint;
    this parent only waits for them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
           script, *argv]
    env = {**os.environ, **SAFE_NCCL_ENV, LAUNCHED_ENV: "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    logger.info("starting %d processes: %s", num_processes, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers handle it
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
