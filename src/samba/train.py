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
import signal
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, resume
from .config import ConfigError, Params
from .cuda_graphs import GraphedCallable, graphs_wanted
from .data import TOKENIZER_FILE, DataError, TokenWindows, check_vocab, load_split, read_meta, tokenizer_files
from .distill import Teacher, distilling
from .errors import TrainingInterrupted
from .evaluate import evaluate_model
from .io import write_json_atomic
from .loss import SambaObjective
from .model import Samba
from .model_files import require_model_dir
from .plots import plot_training_curves
from .runtime import autocast, autocast_dtype, describe, resolve_device, seed_everything
from .sparsity import ramp
from .tracking import LogWindow, MetricsLogger

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
    KeyboardInterrupt at once. Ranks agree on stopping through ``distributed.HostFlags``. Once
    every step is done (``finishing``), a request lets the run finish its writes (seconds): a
    stop there would lose the run, since the last steps have no checkpoint of their own."""

    def __init__(self):
        self.requested = False
        self.finishing = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        what = ("every step is done; writing the model and metrics first" if self.finishing else
                "stopping after this step (a checkpoint keeps every completed step)")
        logger.warning("%s: %s; press Ctrl-C again to stop at once", signal.Signals(signum).name, what)

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


class Validator:
    """Validation during training, on the rank that logs: every ``eval_every`` steps and after the
    last, the first ``eval_batches`` batches of the validation split."""

    def __init__(self, params: Params, model: Samba, windows: TokenWindows, dtype: torch.dtype | None,
                 total_steps: int):
        self.params, self.model, self.windows, self.dtype, self.total_steps = params, model, windows, dtype, total_steps

    def should_validate(self, step: int) -> bool:
        return step % self.params.training.eval_every == 0 or step == self.total_steps

    def validate(self) -> dict[str, float]:
        t, ev = self.params.training, self.params.eval
        m, _ = evaluate_model(self.model, self.windows, t.batch_size, max_windows=t.eval_batches * t.batch_size,
                              dtype=self.dtype, near_zero_eps=ev.near_zero_eps, near_zero_rel=ev.near_zero_rel,
                              graphs=self.params.compute.cuda_graphs, desc=None)
        s = m["sparsity"]
        return {"val/loss": m["loss"], "val/ppl": m["ppl"], "val/readout_ppl": m["readout_ppl"],
                "val/accuracy": m["accuracy"], "val/sparsity_l0": s["l0"], "val/sparsity_near_zero": s["near_zero"],
                "val/sparsity_near_zero_rel": s["near_zero_rel"]}


class Trainer:
    """One training run: set up by ``__init__``, run by ``run``. The loop's parts are objects of
    their own: the step (``step_fn``), the log window (``tracking.LogWindow``), validation
    (``Validator``) and the run's checkpoints (``resume.Checkpointer``)."""

    def __init__(self, params: Params, data_dir: Path, init_dir: Path, out_dir: Path, metrics_dir: Path,
                 checkpoint_dir: Path, ctx: distributed.Context, device: torch.device):
        self.params, self.t, self.ctx, self.device = params, params.training, ctx, device
        self.data_dir, self.init_dir, self.out_dir, self.metrics_dir = data_dir, init_dir, out_dir, metrics_dir
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
        val_windows = TokenWindows.from_numpy(load_split(data_dir, "validation"), t.seq_len,
                                              device).require_one("validation")
        self._plan_steps()
        self.validator = Validator(params, self.model, val_windows, self.dtype, self.total_steps)
        self.epoch, self.order = -1, None  # the epoch the loop is in, and its window order (on the device)

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
        self.checkpoints = resume.Checkpointer(checkpoint_dir, self._fingerprint(), t.keep == "best", ctx.is_main)

    def _plan_steps(self) -> None:
        """Steps per epoch, in all, and of the sparsity ramp; a train split of less than one batch
        is refused, a ramp that outlasts the run is warned of."""
        t = self.t
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

    def _fingerprint(self) -> dict:
        """What a checkpoint must agree with to be resumed (``resume.fingerprint``)."""
        inputs = {"init": self.init_dir, "data": self.data_dir}
        if self.objective.teacher is not None:  # the directory the teacher was loaded from
            inputs["teacher"] = self.objective.teacher.path
        return resume.fingerprint(self.params, "bf16" if self.dtype is not None else "fp32", inputs)

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

    def _resume(self) -> dict:
        """Load this run's checkpoint, if any (``Checkpointer.resume``); return the step it was
        taken after, the rows logged, the W&B id and the log window (0, [], None, None if none)."""
        saved = self.checkpoints.resume(self.model, self.optimizer)
        distributed.barrier()  # every process has read it before any writes a new one
        if saved is None:
            return {"step": 0, "history": [], "wandb_id": None, "window": None}
        logger.info("resuming from %s at step %d of %d", self.checkpoints.path, saved["step"], self.total_steps)
        return saved

    def run(self) -> dict:
        """Train from step 0, or from this run's checkpoint, to ``total_steps``; then ``_finish``."""
        t, ctx, total = self.t, self.ctx, self.total_steps
        saved = self._resume()
        logger.info("training on %s: %d steps (%d per epoch), %d trainable parameters%s%s",
                    describe(self.device, self.dtype), total, self.steps_per_epoch,
                    sum(p.numel() for p in self.trainable), ", CUDA graphs" if self.graphs else "",
                    f", {ctx.world_size} processes" if ctx.distributed else "")
        log = (MetricsLogger(self.params, self.checkpoints.live_dir, saved["history"], saved["wandb_id"])
               if ctx.is_main else None)
        flags = distributed.HostFlags()
        done = saved["step"]
        window = LogWindow(self.objective.part_names, t, self.device, ctx.world_size, self.checkpoints.path, done,
                           saved["window"])
        bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, disable=not ctx.is_main)
        with StopRequests() as stop:
            try:
                while done < total:
                    lr = self._step(done, window)
                    done += 1
                    bar.update(1)
                    row: dict[str, float] = {}
                    if done % t.log_every == 0 or done == total:
                        row = self._train_row(window, done, lr)
                        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
                    with window.pause():  # validation and checkpoints are not throughput
                        if self.validator.should_validate(done) and ctx.is_main:
                            row.update(self.validator.validate())
                            self.checkpoints.keep_best(done, row["val/ppl"], self.model)
                        if row and log is not None:
                            log.log(done, row)
                        if done % t.checkpoint_every == 0 and done < total:
                            self._save(done, log, window)
                        if stop.requested if not ctx.distributed else flags.any(stop.requested):
                            self._save(done, log, window)
                            raise TrainingInterrupted(
                                f"interrupted after step {done} of {total}; {self.checkpoints.path} "
                                "holds every completed step: run the stage again (dvc repro) to resume")
                stop.finishing = True
            finally:
                bar.close()
                self.step_fn.release()
            return self._finish(log)

    def _step(self, step: int, window: LogWindow) -> float:
        """Run step ``step`` (0-based), its loss parts summed into ``window``; returns its
        learning rate. Each epoch has its own window offset and order (``epoch_order``)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            offset, order = epoch_order(self.t.seed, epoch, len(self.train_windows.tokens), self.t.seq_len)
            self.order = order.to(self.device)  # once per epoch: a copy per step would sync
            self.train_windows.offset = offset
        lr = self._set_schedule(step)
        B = self.t.batch_size
        batch = self.train_windows.batch(distributed.shard(self.order[i * B:(i + 1) * B], self.ctx))
        window.add(step, self.step_fn(*batch))
        return lr

    def _headline(self, log: MetricsLogger, summary: dict) -> dict:
        validated = [m["val/ppl"] for _, m in log.rows if "val/ppl" in m]
        kept = [m["val/ppl"] for step, m in log.rows if step == summary.get("kept_step") and "val/ppl" in m]
        return training_headline(self.total_steps, self.t.batch_size * self.t.seq_len,
                                 (kept or validated or [None])[-1])

    def _train_row(self, window: LogWindow, done: int, lr: float) -> dict[str, float]:
        """The training metrics logged after ``done`` steps (closing the log window)."""
        parts, tokens_per_s = window.close(done)
        row = {**parts, "train/lr": lr, "train/epoch": done / self.steps_per_epoch, "train/tokens_per_s": tokens_per_s}
        if self.model.sparse:
            row["train/sparsity_fraction"] = float(self.model.sparsity_fraction)
        return row

    def _save(self, done: int, log: MetricsLogger | None, window: LogWindow) -> None:
        """A checkpoint after ``done`` steps (every process takes part: the window is summed over ranks)."""
        self.checkpoints.save(done, self.model, self.optimizer, log, window.state(done))

    def _finish(self, log: MetricsLogger | None) -> dict:
        """The completed run: the weights kept become the model, the metrics directory is replaced
        whole, the checkpoint goes. Returns the summary: steps, kept step, last validation."""
        distributed.barrier()
        summary = {"steps": self.total_steps}
        if self.ctx.is_main:
            kept = self.checkpoints.restore_best(self.model, self.device)
            if kept is not None:
                summary["kept_step"] = kept["step"]
            self.model.set_sparsity(None)
            self.model.save_pretrained(self.out_dir, extra_files=tokenizer_files(self.data_dir))
            log.end()
            plot_training_curves(log.history(), self.checkpoints.live_dir / "training_curves.png")
            write_json_atomic(self.checkpoints.live_dir / SUMMARY_FILE, self._headline(log, summary))
            self.checkpoints.complete(self.metrics_dir)
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
