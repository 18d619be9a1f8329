"""Fine-tuning with the combined loss: AdamW, warm-up + cosine decay, bf16 autocast on CUDA,
gradient clipping, periodic validation and sparsity, resumable checkpoints, dvclive logging.

The step never waits on the host: losses are summed on the device and read only every
``log_every`` steps; batches are cut from token arrays that already sit on the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import require_model_dir
from .config import ConfigError, Params
from .data import DataError, TokenWindows, check_vocab, load_split, read_meta
from .evaluate import evaluate_model
from .loss import samba_loss
from .model import Samba
from .plots import plot_training_curves
from .runtime import autocast, autocast_dtype, describe, resolve_device, seed_everything

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "last.pt"


def check_params(params: Params) -> None:
    """Combinations that cannot train, refused before any work."""
    t = params.training
    if params.pretrained.freeze_backbone and t.readout_weight == 0:
        raise ConfigError("training.readout_weight: is 0 while pretrained.freeze_backbone is true, "
                          "so nothing would train")
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


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def epoch_order(seed: int, epoch: int, n_tokens: int, seq_len: int) -> tuple[int, torch.Tensor]:
    """This epoch's token offset into the split (0 for the first, so window edges move from
    epoch to epoch) and its shuffled window order; seeded, so a resumed run sees the same."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    offset = int(torch.randint(0, seq_len, (1,), generator=gen)) if epoch > 0 else 0
    return offset, torch.randperm((n_tokens - 1 - offset) // seq_len, generator=gen)


def fingerprint(params: Params, data_dir: Path, init_dir: Path) -> str:
    """What a resumable checkpoint must agree with to be resumed."""
    parts = {"training": params.training.to_dict(), "model": params.model.to_dict(),
             "pretrained": params.pretrained.to_dict(), "precision": params.compute.precision,
             "meta": read_meta(data_dir), "init": (init_dir / "config.json").read_text(),
             "init_size": (init_dir / "model.safetensors").stat().st_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def save_checkpoint(path: Path, step: int, model, optimizer, scheduler, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "fingerprint": key, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, path)


def try_resume(path: Path, key: str, model, optimizer, scheduler) -> int:
    """Load ``path`` if it was written by this same configuration; return the step to start at."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != key:
        logger.warning("ignoring %s: it was written with other params or data", path)
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming from %s at step %d", path, state["step"])
    return int(state["step"])


class MetricsLogger:
    """dvclive always (it never writes dvc.yaml: the pipeline declares metrics and plots);
    Weights & Biases too when ``logging.use_wandb``."""

    def __init__(self, params: Params, metrics_dir: Path, resume: bool):
        from dvclive import Live

        self.live = Live(dir=str(metrics_dir), dvcyaml=None, save_dvc_exp=False, resume=resume)
        self.wandb = None
        if params.logging.use_wandb:
            import wandb

            self.wandb = wandb.init(project=params.logging.project_name, config=params.to_dict())
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
            self.history.setdefault(name, []).append((step, value))
        self.live.next_step()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def end(self) -> None:
        self.live.end()
        if self.wandb is not None:
            self.wandb.finish()


def _validation_metrics(model, windows, params, dtype) -> dict[str, float]:
    t = params.training
    m, _ = evaluate_model(model, windows, t.batch_size, max_windows=t.eval_batches * t.batch_size,
                          dtype=dtype, near_zero_eps=params.eval.near_zero_eps,
                          near_zero_rel=params.eval.near_zero_rel, desc=None)
    s = m["sparsity"]
    return {"val/loss": m["loss"], "val/ppl": m["ppl"], "val/readout_ppl": m["readout_ppl"],
            "val/sparsity_l0": s["l0"], "val/sparsity_near_zero": s["near_zero"],
            "val/sparsity_near_zero_rel": s["near_zero_rel"]}


def train(params: Params, data_dir: str | Path, init_dir: str | Path, out_dir: str | Path,
          metrics_dir: str | Path, checkpoint_dir: str | Path) -> dict:
    """Train the model in ``init_dir`` on ``data_dir``; write ``out_dir``. Returns a summary."""
    data_dir, init_dir, out_dir = Path(data_dir), Path(init_dir), Path(out_dir)
    metrics_dir, checkpoint_path = Path(metrics_dir), Path(checkpoint_dir) / CHECKPOINT_FILE
    t = params.training
    check_params(params)
    device = resolve_device(params.compute)
    dtype = autocast_dtype(params.compute, device)
    seed_everything(t.seed)

    meta = read_meta(data_dir)
    require_model_dir(init_dir, "convert")
    model = Samba.from_pretrained(init_dir, backend=params.compute.backend)
    if model.config != params.model:
        diff = {k: (v, getattr(params.model, k)) for k, v in model.config.to_dict().items()
                if getattr(params.model, k) != v}
        raise ConfigError(f"{init_dir} was written for another model section (init, params): {diff}; "
                          "rerun the convert stage")
    check_vocab(meta, model.config.vocab_size)
    if params.pretrained.freeze_backbone:
        model.freeze_backbone()
    model.to(device).train()
    if params.compute.compile:
        model.compile_parts()

    train_windows = TokenWindows.from_numpy(load_split(data_dir, "train"), t.seq_len, device)
    val_windows = TokenWindows.from_numpy(load_split(data_dir, "validation"), t.seq_len, device)
    # the shortest epoch (largest offset) fixes the steps per epoch
    steps_per_epoch = len(TokenWindows(train_windows.tokens, t.seq_len, t.seq_len - 1)) // t.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the train split has {len(train_windows.tokens)} tokens: not one batch of "
                        f"training.batch_size={t.batch_size} x training.seq_len={t.seq_len}")
    if len(val_windows) == 0:
        raise DataError(f"the validation split has {len(val_windows.tokens)} tokens: not one window "
                        f"of training.seq_len={t.seq_len}")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.warmup_steps, total_steps, t.min_lr_ratio))
    key = fingerprint(params, data_dir, init_dir)
    start = try_resume(checkpoint_path, key, model, optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info("training on %s: %d steps (%d per epoch), %d trainable parameters",
                describe(device, dtype), total_steps, steps_per_epoch, sum(p.numel() for p in trainable))

    log = MetricsLogger(params, metrics_dir, resume=start > 0)
    sums: dict[str, torch.Tensor] = {}
    summed_steps, tokens_per_step = 0, t.batch_size * t.seq_len
    epoch, order = -1, None
    last_val: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    clock = time.perf_counter()
    step = start
    try:
        for step in range(start, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                offset, order = epoch_order(t.seed, epoch, len(train_windows.tokens), t.seq_len)
                order = order.to(device)  # once per epoch: a host-to-device copy per step would sync
                train_windows.offset = offset
            i = step % steps_per_epoch
            inputs, targets = train_windows.batch(order[i * t.batch_size:(i + 1) * t.batch_size])
            with autocast(device, dtype):
                parts = samba_loss(model, inputs, targets, t.readout_weight, t.pruning_weight)
            parts.total.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in parts.detached().items():  # summed on the device, read at log steps
                sums[name] = sums[name] + value if name in sums else value.float()
            summed_steps += 1
            bar.update(1)

            done = step + 1
            if done % t.log_every == 0 or done == total_steps:
                values = {f"train/{k}": (v / summed_steps).item() for k, v in sums.items()}
                elapsed = time.perf_counter() - clock
                if not math.isfinite(values["train/loss"]):
                    raise FloatingPointError(f"training loss is {values['train/loss']} at step {done}; "
                                             "lower training.lr or raise training.grad_clip")
                values["train/lr"] = scheduler.get_last_lr()[0]
                values["train/tokens_per_s"] = summed_steps * tokens_per_step / elapsed
                values["train/epoch"] = done / steps_per_epoch
                if done % t.eval_every == 0 or done == total_steps:
                    last_val = _validation_metrics(model, val_windows, params, dtype)
                    values.update(last_val)
                log.log(done, values)
                bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
                sums, summed_steps = {}, 0
                clock = time.perf_counter()  # validation time is not training throughput
            if done % t.checkpoint_every == 0 and done < total_steps:
                save_checkpoint(checkpoint_path, done, model, optimizer, scheduler, key)
    except KeyboardInterrupt:
        save_checkpoint(checkpoint_path, step, model, optimizer, scheduler, key)
        logger.warning("interrupted: saved %s at step %d; rerun to resume", checkpoint_path, step)
        raise
    finally:
        bar.close()

    model.save_pretrained(out_dir)
    log.end()
    plot_training_curves(log.history, metrics_dir / "training_curves.png")
    checkpoint_path.unlink(missing_ok=True)
    return {"steps": total_steps, **last_val}
