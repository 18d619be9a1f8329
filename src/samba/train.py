"""Fine-tuning with the combined loss: AdamW, warm-up + cosine decay, bf16 autocast on CUDA,
gradient clipping, the sparsity ramp, validation every ``eval_every`` steps, resumable
checkpoints, dvclive (and W&B) logging, one or several processes.

The step never waits on the host: on CUDA it is one replayed CUDA graph (``cuda_graphs``);
the learning rate and the sparsity fraction are device tensors set before each step; losses
are summed on the device and read only every ``log_every`` steps.

Interruptions. Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary: it
saves a checkpoint of the completed steps and exits; a second Ctrl-C stops at once. A hard
kill loses only the steps since the last periodic checkpoint. Either way, running the stage
again resumes and ends at the weights an uninterrupted run ends at (``resume``). The model and
the metrics directory are replaced whole only when the run completes: an interrupted, failed
or refused run leaves the earlier ones as they were.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed, resume
from .checkpoint import require_model_dir
from .config import ConfigError, Params
from .cuda_graphs import GraphedCallable, graphs_wanted
from .data import TOKENIZER_FILE, DataError, TokenWindows, check_vocab, load_split, read_meta, tokenizer_files
from .distill import Teacher, distilling
from .errors import TrainingInterrupted
from .evaluate import evaluate_model
from .io import atomic_dir, atomic_file, write_json_atomic
from .loss import SambaObjective
from .model import Samba
from .plots import plot_training_curves
from .runtime import autocast, autocast_dtype, describe, resolve_device, seed_everything
from .sparsity import ramp
from .tracking import MetricsLogger

logger = logging.getLogger(__name__)


def check_params(params: Params) -> None:
    """Combinations that cannot train, refused before any work."""
    t = params.training
    if params.pretrained.freeze_backbone and t.readout_weight == 0:
        raise ConfigError("training.readout_weight: is 0 while pretrained.freeze_backbone is true, "
                          "so nothing would train")
    if t.batch_size % params.compute.num_processes:
        raise ConfigError(f"training.batch_size: {t.batch_size} is not divisible by compute.num_processes="
                          f"{params.compute.num_processes} (each process takes an equal share of a step)")
    if params.logging.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.use_wandb: true but wandb is not installed (pip install wandb)") from None


def param_groups(model: Samba, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolution kernels; none on norms, biases, A_log, D."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("A_log") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning-rate multiplier of step ``step`` (0-based): linear warm-up to 1, then
    cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def training_objective(model: Samba, t, teacher: Teacher | None = None) -> SambaObjective:
    """The train stage's objective for ``model`` under the training section ``t`` and ``teacher``
    (``load_teacher``); the benchmark builds its step from it too. At readout_weight 0 nothing
    trains the readout: it is frozen (no gradient, no weight decay), and its CE is still
    computed, forward only, for the log. Call it before making the optimizer."""
    if t.readout_weight == 0:
        model.readout.requires_grad_(False)
    return SambaObjective(model, t.readout_weight, t.pruning_weight, t.pruning_penalty, teacher=teacher,
                          distill_weight=t.distill_weight)


def make_optimizer(model: Samba, t, device: torch.device, graphs: bool) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); under CUDA graphs ``capturable`` with a device-tensor learning rate
    that the captured step reads and the host sets before each replay."""
    lr = torch.tensor(t.lr, device=device) if graphs else t.lr
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda", capturable=graphs)


def training_step(objective, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                  grad_clip: float, device: torch.device, dtype: torch.dtype | None):
    """One optimizer step as a function of the batch, returning the (4,) loss parts: what the
    train stage runs (and captures whole as a CUDA graph) and what the benchmark times."""
    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype, cache=False):
            total, values = objective(inputs, targets)
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip, foreach=device.type == "cuda")
        optimizer.step()
        return values
    return step


def epoch_order(seed: int, epoch: int, n_tokens: int, seq_len: int) -> tuple[int, torch.Tensor]:
    """This epoch's token offset into the split (0 for the first, so window edges move from
    epoch to epoch) and its shuffled window order; seeded, so a resumed run sees the same."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    offset = int(torch.randint(0, seq_len, (1,), generator=gen)) if epoch > 0 else 0
    return offset, torch.randperm((n_tokens - 1 - offset) // seq_len, generator=gen)


class StopRequests:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary; a second SIGINT raises
    KeyboardInterrupt at once. Ranks agree on stopping through ``distributed.HostFlags``."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: stopping after this step (a checkpoint keeps every completed step); "
                       "press Ctrl-C again to stop at once", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def load_init(init_dir: Path, params: Params) -> Samba:
    """The convert stage's model, checked against params' model section; it then carries
    ``model.sparsity_target`` (the converted baseline itself stays dense)."""
    require_model_dir(init_dir, "convert")
    model = Samba.from_pretrained(init_dir, backend=params.compute.backend)
    ours, wanted = model.config.to_dict(), params.model.to_dict()
    diff = {k: (v, wanted[k]) for k, v in ours.items() if k != "sparsity_target" and wanted[k] != v}
    if diff:
        raise ConfigError(f"{init_dir} was written for another model section (init, params): {diff}; "
                          "rerun the convert stage")
    model.set_sparsity_target(params.model.sparsity_target)
    return model


def load_teacher(params: Params, device: torch.device, data_dir: Path | None = None) -> Teacher | None:
    """The distillation teacher (training.teacher) when training.distill_weight is > 0, else None;
    checked against the tokenizer the data in ``data_dir`` was made with."""
    t = params.training
    if not distilling(t):
        return None
    tokenizer = tokenizer_files(data_dir).get(TOKENIZER_FILE) if data_dir is not None else None
    teacher = Teacher.load(t.teacher, params.model, params.compute.backend, device, tokenizer)
    logger.info("distilling from %s (KL weight %g)", t.teacher, t.distill_weight)
    return teacher


class Trainer:
    """One training run: set up by ``__init__``, run by ``run``."""

    def __init__(self, params: Params, data_dir: Path, init_dir: Path, out_dir: Path, metrics_dir: Path,
                 checkpoint_dir: Path, ctx: distributed.Context, device: torch.device):
        self.params, self.t, self.ctx, self.device = params, params.training, ctx, device
        self.data_dir, self.init_dir, self.out_dir, self.metrics_dir = data_dir, init_dir, out_dir, metrics_dir
        self.checkpoint_path = checkpoint_dir / resume.CHECKPOINT_FILE
        self.best_path = checkpoint_dir / resume.BEST_FILE
        self.live_dir = checkpoint_dir / resume.LIVE_DIR  # metrics_dir's content until the run completes
        t = self.t
        self.dtype = autocast_dtype(params.compute, device)
        seed_everything(t.seed)

        meta = read_meta(data_dir)
        self.model = load_init(init_dir, params)
        check_vocab(meta, self.model.config.vocab_size)
        if params.pretrained.freeze_backbone:
            self.model.freeze_backbone()
        self.model.to(device).train()
        if params.compute.compile and device.type == "cuda":  # Inductor on the CPU is slow to build, for little
            self.model.compile_parts()

        self.train_windows = TokenWindows.from_numpy(load_split(data_dir, "train"), t.seq_len, device)
        self.val_windows = TokenWindows.from_numpy(load_split(data_dir, "validation"), t.seq_len,
                                                   device).require_one("validation")
        # the shortest epoch (largest offset) fixes the steps per epoch
        shortest = TokenWindows(self.train_windows.tokens, t.seq_len, t.seq_len - 1)
        self.steps_per_epoch = len(shortest) // t.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the train split has {len(self.train_windows.tokens)} tokens: not one batch of "
                            f"training.batch_size={t.batch_size} x training.seq_len={t.seq_len}")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.ramp_steps = t.sparsity_ramp_steps(self.total_steps)
        target = self.model.config.sparsity_target
        if self.model.sparse and ramp(self.total_steps - 1, self.ramp_steps, target) < target:
            logger.warning("the sparsity ramp (%d steps) does not end before the run's last step (%d steps): training "
                           "ends at a fraction of %.3g, while the saved model applies model.sparsity_target %g",
                           self.ramp_steps, self.total_steps, ramp(self.total_steps - 1, self.ramp_steps, target),
                           target)

        self.graphs = graphs_wanted(params.compute.cuda_graphs, device)
        # before the optimizer: at readout_weight 0 it freezes the readout
        self.objective = training_objective(self.model, t, load_teacher(params, device, data_dir))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, t, device, self.graphs)
        step = training_step(self._data_parallel(self.objective), self.optimizer, self.trainable, t.grad_clip,
                             device, self.dtype)
        # DDP must have run 11 eager iterations before its backward is captured.
        self.step_fn = GraphedCallable(step, enabled=self.graphs, warmup=11 if ctx.distributed else 3,
                                       name="training step")

    def _data_parallel(self, objective):
        if not self.ctx.distributed:
            return objective
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = dict(broadcast_buffers=False)  # the sparsity fraction is set alike on every rank
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # as CUDA-graph capture of DDP requires
                wrapped = DDP(objective, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            return wrapped
        return DDP(objective, **kwargs)

    def _set_schedule(self, step: int) -> float:
        """Learning rate and sparsity fraction of step ``step``; returns the learning rate."""
        t = self.t
        lr = t.lr * lr_factor(step, t.warmup_steps, self.total_steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if self.model.sparse:
            self.model.set_sparsity(ramp(step, self.ramp_steps, self.model.config.sparsity_target))
        return lr

    def _validate(self) -> dict[str, float]:
        t, ev = self.t, self.params.eval
        m, _ = evaluate_model(self.model, self.val_windows, t.batch_size, max_windows=t.eval_batches * t.batch_size,
                              dtype=self.dtype, near_zero_eps=ev.near_zero_eps, near_zero_rel=ev.near_zero_rel,
                              graphs=self.params.compute.cuda_graphs, desc=None)
        s = m["sparsity"]
        return {"val/loss": m["loss"], "val/ppl": m["ppl"], "val/readout_ppl": m["readout_ppl"],
                "val/accuracy": m["accuracy"], "val/sparsity_l0": s["l0"], "val/sparsity_near_zero": s["near_zero"],
                "val/sparsity_near_zero_rel": s["near_zero_rel"]}

    def _state(self, step: int, log: MetricsLogger | None, best: dict | None, key: dict, window: dict) -> dict:
        return {"step": step, "fingerprint": key, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": log.rows if log else [],
                "best": best, "wandb_id": log.wandb_id if log else None, "window": window}

    def run(self) -> dict:
        t, ctx, device = self.t, self.ctx, self.device
        inputs = {"init": self.init_dir, "data": self.data_dir}
        if self.objective.teacher is not None:  # the directory the teacher was loaded from
            inputs["teacher"] = self.objective.teacher.path
        key = resume.fingerprint(self.params, "bf16" if self.dtype is not None else "fp32", inputs)
        state = resume.load(self.checkpoint_path, key, may_set_aside=ctx.is_main)
        distributed.barrier()  # every process has read it before any writes a new one
        start, best, history, wandb_id, window = 0, None, [], None, None
        if state is not None:
            self.model.load_state_dict(state["model"])
            resume.load_optimizer_state(self.optimizer, state["optimizer"])
            start, best, history, wandb_id = state["step"], state["best"], state["history"], state["wandb_id"]
            window = state["window"]
            logger.info("resuming from %s at step %d of %d", self.checkpoint_path, start, self.total_steps)
        del state
        logger.info("training on %s: %d steps (%d per epoch), %d trainable parameters%s%s",
                    describe(device, self.dtype), self.total_steps, self.steps_per_epoch,
                    sum(p.numel() for p in self.trainable), ", CUDA graphs" if self.graphs else "",
                    f", {ctx.world_size} processes" if ctx.distributed else "")
        log = MetricsLogger(self.params, self.live_dir, history, wandb_id) if ctx.is_main else None
        flags = distributed.HostFlags()
        B, tokens_per_step = t.batch_size, t.batch_size * t.seq_len
        names = self.objective.part_names
        sums = torch.zeros(len(names), device=device)  # loss parts summed since the last log
        step_losses = torch.zeros(min(t.log_every, t.checkpoint_every), device=device)  # since the last check
        done = log_start = check_start = start
        epoch, order, paused = -1, None, 0.0
        clock = time.perf_counter()
        if window is not None:  # the log window the checkpoint fell in continues where it stopped
            log_start, clock = window["start"], clock - window["elapsed"]
            sums += window["sums"].to(device) / ctx.world_size  # the all-ranks total, shared out again
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not ctx.is_main)

        def check_finite() -> None:
            """Raise naming the first step whose loss was not finite (reads the losses: a sync)."""
            nonlocal check_start
            bad = (~torch.isfinite(step_losses[:done - check_start])).nonzero()
            if bad.numel():
                raise FloatingPointError(
                    f"training loss is not finite at step {check_start + int(bad[0]) + 1}; stopped there. "
                    f"The last checkpoint ({self.checkpoint_path}, if any) and earlier outputs are kept. "
                    "Lower training.lr or raise training.grad_clip")
            check_start = done

        def save_checkpoint() -> None:
            check_finite()
            window = {"start": log_start, "sums": distributed.all_reduce_(sums.clone()).cpu(),
                      "elapsed": time.perf_counter() - clock - paused}
            if ctx.is_main:
                resume.save(self.checkpoint_path, self._state(done, log, best, key, window))

        with StopRequests() as stop:
            try:
                while done < self.total_steps:
                    if done // self.steps_per_epoch != epoch:
                        epoch = done // self.steps_per_epoch
                        offset, order = epoch_order(t.seed, epoch, len(self.train_windows.tokens), t.seq_len)
                        order = order.to(device)  # once per epoch: a copy per step would sync
                        self.train_windows.offset = offset
                    i = done % self.steps_per_epoch
                    lr = self._set_schedule(done)
                    values = self.step_fn(*self.train_windows.batch(distributed.shard(order[i * B:(i + 1) * B], ctx)))
                    sums += values
                    step_losses[done - check_start] = values[0]
                    done += 1
                    bar.update(1)

                    row: dict[str, float] = {}
                    if done % t.log_every == 0 or done == self.total_steps:
                        check_finite()
                        means = distributed.all_reduce_(sums.clone()) / ((done - log_start) * ctx.world_size)
                        elapsed = time.perf_counter() - clock - paused
                        row.update({f"train/{k}": v for k, v in zip(names, means.tolist())})
                        row.update({"train/lr": lr, "train/epoch": done / self.steps_per_epoch,
                                    "train/tokens_per_s": (done - log_start) * tokens_per_step / elapsed})
                        if self.model.sparse:
                            row["train/sparsity_fraction"] = float(self.model.sparsity_fraction)
                        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
                        sums.zero_()
                        log_start, clock, paused = done, time.perf_counter(), 0.0
                    pause = time.perf_counter()  # validation and checkpoints are not throughput
                    if done % t.eval_every == 0 or done == self.total_steps:
                        if ctx.is_main:
                            row.update(self._validate())
                            best = self._keep_best(done, row, best)
                    if row and log is not None:
                        log.log(done, row)
                    if done % t.checkpoint_every == 0 and done < self.total_steps:
                        save_checkpoint()
                    if stop.requested if not ctx.distributed else flags.any(stop.requested):
                        save_checkpoint()
                        raise TrainingInterrupted(
                            f"interrupted after step {done} of {self.total_steps}; {self.checkpoint_path} "
                            "holds every completed step: run the stage again (dvc repro) to resume")
                    paused += time.perf_counter() - pause
            finally:
                bar.close()
                self.step_fn.release()
        return self._finish(log, best)

    def _keep_best(self, step: int, row: dict, best: dict | None) -> dict | None:
        """With training.keep: best, save the weights of the lowest validation ppl among the
        validations that ran at model.sparsity_target (after the ramp; on the rank that validates)."""
        if self.t.keep != "best" or self.model.sparsity_value < self.model.config.sparsity_target:
            return best
        if best is None or row["val/ppl"] < best["val_ppl"]:
            with atomic_file(self.best_path) as tmp:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, tmp)
            best = {"step": step, "val_ppl": row["val/ppl"]}
        return best

    def _headline(self, log: MetricsLogger, summary: dict) -> dict:
        validated = [m["val/ppl"] for _, m in log.rows if "val/ppl" in m]
        kept = [m["val/ppl"] for step, m in log.rows if step == summary.get("kept_step") and "val/ppl" in m]
        return training_headline(self.total_steps, self.t.batch_size * self.t.seq_len,
                                 (kept or validated or [None])[-1])

    def _finish(self, log: MetricsLogger | None, best: dict | None) -> dict:
        distributed.barrier()
        summary = {"steps": self.total_steps}
        if self.ctx.is_main:
            if self.t.keep == "best":
                if best is None:
                    logger.warning("training.keep: best, but no validation ran at model.sparsity_target (after "
                                   "the sparsity ramp); keeping the last weights")
                else:
                    self.model.load_state_dict(load_file(self.best_path, device=str(self.device)), strict=False)
                    logger.info("keeping the weights of step %d (validation ppl %.3f)", best["step"], best["val_ppl"])
                    summary["kept_step"] = best["step"]
            self.model.set_sparsity(None)
            self.model.save_pretrained(self.out_dir, extra_files=tokenizer_files(self.data_dir))
            log.end()
            plot_training_curves(log.history(), self.live_dir / "training_curves.png")
            write_json_atomic(self.live_dir / SUMMARY_FILE, self._headline(log, summary))
            with atomic_dir(self.metrics_dir) as tmp:  # whole, or the earlier run's as it was
                shutil.copytree(self.live_dir, tmp, dirs_exist_ok=True)
            self.checkpoint_path.unlink(missing_ok=True)
            self.best_path.unlink(missing_ok=True)
            shutil.rmtree(self.live_dir, ignore_errors=True)
            last = [m for _, m in log.rows if "val/ppl" in m]
            summary.update({k: v for k, v in (last[-1] if last else {}).items()})
        distributed.barrier()
        return summary


SUMMARY_FILE = "summary.json"  # in the metrics directory: what DVC tabulates of a training run


def training_headline(steps: int, tokens_per_step: int, val_ppl: float | None) -> dict:
    """The run's headline: its budget (optimizer steps and the training tokens they saw) and the
    validation ppl of the weights it kept."""
    return {"steps": steps, "tokens": steps * tokens_per_step, "val_ppl": val_ppl}


def train(params: Params, data_dir: str | Path, init_dir: str | Path, out_dir: str | Path,
          metrics_dir: str | Path, checkpoint_dir: str | Path) -> dict:
    """Train the model in ``init_dir`` on ``data_dir``; write ``out_dir``. Returns a summary.
    Under torchrun, each process calls this; rank 0 writes."""
    check_params(params)
    ctx = distributed.context_from_env()
    device = resolve_device(params.compute, ctx.local_rank if ctx.distributed else None)
    distributed.init(ctx, device)
    try:
        trainer = Trainer(params, Path(data_dir), Path(init_dir), Path(out_dir), Path(metrics_dir),
                          Path(checkpoint_dir), ctx, device)
        return trainer.run()
    finally:
        distributed.shutdown()
