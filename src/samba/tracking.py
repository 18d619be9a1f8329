"""Where training metrics go: dvclive always, Weights & Biases too when ``logging.use_wandb``
(its run's config is the whole of params.yaml, which DVC tracks for dvclive's side).

dvclive never writes a dvc.yaml here (the pipeline declares metrics and plots). The train
stage logs into a directory beside its checkpoint and moves it into place when the run
completes (``train``), so an interrupted or failed run leaves the earlier metrics as they were.
Every logged row is also kept in memory and saved in the resumable checkpoint; a resumed run
starts a fresh dvclive directory and writes those rows again first, so the curves hold every
logged step exactly once.

``LogWindow`` is what a row of training metrics sums up: the steps since the last row, kept on
the device so that the step loop never waits on the host; a checkpoint holds it too.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import distributed
from .config import Params

Row = tuple[int, dict[str, float]]


class MetricsLogger:
    def __init__(self, params: Params, metrics_dir: Path, history: list[Row] | None = None,
                 wandb_id: str | None = None):
        from dvclive import Live

        self.rows: list[Row] = []
        self.live = Live(dir=str(metrics_dir), dvcyaml=None, save_dvc_exp=False, resume=False)
        for step, metrics in history or []:
            self._to_live(step, metrics)
            self.rows.append((step, metrics))
        self.wandb = None
        if params.logging.use_wandb:
            import wandb

            # A resumed run continues the same W&B run (its id is kept in the checkpoint).
            self.wandb = wandb.init(project=params.logging.project_name, config=params.to_dict(),
                                    id=wandb_id, resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def _to_live(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._to_live(step, metrics)
        self.rows.append((step, dict(metrics)))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """name -> [(step, value)], for the curves picture."""
        out: dict[str, list[tuple[int, float]]] = {}
        for step, metrics in self.rows:
            for name, value in metrics.items():
                out.setdefault(name, []).append((step, value))
        return out

    def end(self) -> None:
        self.live.end()
        if self.wandb is not None:
            self.wandb.finish()


class LogWindow:
    """The steps since the last logged row: their loss parts summed on the device, each one's
    loss since the last finiteness check, their time less validation and checkpoints
    (``pause``). Read on the host only when a row is made (``close``, every log_every steps) or
    a checkpoint is written (``state``); both check finiteness first, and a non-finite loss's
    error names ``checkpoint``. ``saved``, a checkpoint's ``state``, continues its window."""

    def __init__(self, part_names: Sequence[str], t, device: torch.device, world_size: int, checkpoint: Path,
                 start: int, saved: dict | None = None):
        self.part_names, self.world_size, self.checkpoint = list(part_names), world_size, checkpoint
        self.tokens_per_step = t.batch_size * t.seq_len
        self.sums = torch.zeros(len(self.part_names), device=device)  # loss parts summed since the last row
        self.losses = torch.zeros(min(t.log_every, t.checkpoint_every), device=device)  # since the last check
        self.start = self.checked = start
        self.clock, self.paused = time.perf_counter(), 0.0
        if saved is not None:  # the log window the checkpoint fell in continues where it stopped
            self.start, self.clock = saved["start"], self.clock - saved["elapsed"]
            self.sums += saved["sums"].to(device) / world_size  # the all-ranks total, shared out again

    def add(self, step: int, parts: torch.Tensor) -> None:
        """The loss parts of step ``step`` (0-based), on the device."""
        self.sums += parts
        self.losses[step - self.checked] = parts[0]

    def check_finite(self, done: int) -> None:
        """Raise naming the first step whose loss was not finite (reads the losses: a sync)."""
        bad = (~torch.isfinite(self.losses[:done - self.checked])).nonzero()
        if bad.numel():
            raise FloatingPointError(
                f"training loss is not finite at step {self.checked + int(bad[0]) + 1}; stopped there. "
                f"The last checkpoint ({self.checkpoint}, if any) and earlier outputs are kept. "
                "Lower training.lr or raise training.grad_clip")
        self.checked = done

    def close(self, done: int) -> tuple[dict[str, float], float]:
        """The row of the window ending after ``done`` steps: each loss part's mean over its steps
        and every rank ("train/<part>"), and the tokens per second. The next window starts."""
        self.check_finite(done)
        means = distributed.all_reduce_(self.sums.clone()) / ((done - self.start) * self.world_size)
        elapsed = time.perf_counter() - self.clock - self.paused
        tokens_per_s = (done - self.start) * self.tokens_per_step / elapsed
        parts = {f"train/{k}": v for k, v in zip(self.part_names, means.tolist())}
        self.sums.zero_()
        self.start, self.clock, self.paused = done, time.perf_counter(), 0.0
        return parts, tokens_per_s

    def state(self, done: int) -> dict:
        """The window as a checkpoint after ``done`` steps keeps it (the sums of every rank: every
        rank calls this)."""
        self.check_finite(done)
        return {"start": self.start, "sums": distributed.all_reduce_(self.sums.clone()).cpu(),
                "elapsed": time.perf_counter() - self.clock - self.paused}

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Time that is not throughput (validation, checkpoints): left out of tokens_per_s."""
        began = time.perf_counter()
        yield
        self.paused += time.perf_counter() - began
