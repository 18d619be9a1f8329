"""The CUDA-graph fast path: a function's kernels captured once, then replayed.

A Samba training step launches about 1,700 kernels; launched one by one from Python, the
GPU sat idle waiting for the host for about 40% of the step (benchmarks/results/2026-11-30/
train_step.md). Captured in a CUDA graph (``torch.cuda.graph``), one replay launches them all.
Training (the whole step: forward, backward, clipping, AdamW), evaluation (one batch) and
decoding (one token) each go through ``GraphedCallable``.

What a captured function must respect (PyTorch's "whole-network capture" rules):
- static shapes and addresses: the call's tensors are copied into inputs captured once, and
  a call of another shape runs eagerly instead;
- no host synchronisation inside (no ``.item()``, no data-dependent shapes): values that change
  between calls (the learning rate, the sparsity fraction) live in device tensors;
- autocast without its weight-cast cache (``runtime.autocast(..., cache=False)``);
- the first ``warmup`` calls run eagerly on a side stream (lazy initialisation, cuBLAS
  workspaces, Triton autotuning, DDP's bucket rebuilding) before the capture. Those calls do
  their real work: a training step during warm-up is a real step.
A replay's outputs live in the graph's memory and are overwritten by the next replay: use
them (copy or accumulate) before calling again.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def graphs_wanted(enabled: bool, device: torch.device) -> bool:
    """``compute.cuda_graphs`` applies on CUDA only; the CPU always runs eagerly."""
    return enabled and device.type == "cuda"


class GraphedCallable:
    """``fn(*tensors)`` -> tensor or tuple of tensors, captured after ``warmup`` eager calls."""

    def __init__(self, fn: Callable, enabled: bool, warmup: int = 3, name: str = "step"):
        self.fn, self.enabled, self.warmup, self.name = fn, enabled, warmup, name
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None  # the warm-up stream
        self.static_inputs: list[torch.Tensor] = []
        self.static_output = None

    def _shape_key(self, args: Sequence[torch.Tensor]):
        return [(a.shape, a.dtype, a.device) for a in args]

    def __call__(self, *args: torch.Tensor):
        if not self.enabled:
            return self.fn(*args)
        if self.graph is not None and self._shape_key(args) != self._shape_key(self.static_inputs):
            return self.fn(*args)  # another shape (a last, shorter batch): eagerly
        if self.calls < self.warmup:
            self.calls += 1
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            try:
                self._capture(args)
            except Exception as err:  # a capture nothing ran in: the eager path stays right
                logger.warning("%s: CUDA-graph capture failed (%s: %s); running eagerly", self.name,
                               type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                self.enabled, self.graph, self.static_inputs = False, None, []
                torch.cuda.synchronize()
                return self.fn(*args)
        for static, new in zip(self.static_inputs, args):
            static.copy_(new)
        self.graph.replay()
        return self.static_output

    def _capture(self, args: Sequence[torch.Tensor]) -> None:
        self.static_inputs = [a.clone() for a in args]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.fn(*self.static_inputs)
        self.graph = graph
        logger.info("%s captured as a CUDA graph after %d eager warm-up calls", self.name, self.calls)

    def release(self) -> None:
        """Free the graph and its memory pool."""
        self.graph, self.static_inputs, self.static_output = None, [], None
