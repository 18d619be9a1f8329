"""A training run in a process of its own, with a probe on its step function; and the check
that an interrupted run, resumed, follows the uninterrupted one (tests/test_kernels_gpu.py on
CUDA with graphs, tests/test_training.py on the CPU).

    python tests/resume_probe.py PARAMS DATA INIT WHERE RECORD [--signal INT|KILL --at N]

At every step the probe writes one JSON line to RECORD, read from the optimizer itself just
before the step: the learning rate of each param group, the device of that value, whether it
is the very tensor make_optimizer made (under CUDA graphs, the one the captured step reads),
and whether the step ran as a replayed CUDA graph. With --signal it sends this process SIGINT
(as Ctrl-C) or SIGKILL (kill -9) right after launching its N-th step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

WARMUP = 3  # eager steps before the capture (train.py, single process)


class StepProbe:
    def __init__(self, trainer, record: Path, signum: int | None, at: int | None):
        self.trainer, self.inner, self.record = trainer, trainer.step_fn, record
        self.made = [g["lr"] for g in trainer.optimizer.param_groups]  # before any checkpoint is loaded
        self.signum, self.at, self.calls = signum, at, 0

    def __call__(self, *batch):
        groups = self.trainer.optimizer.param_groups
        row = {"call": self.calls, "lr": [float(g["lr"]) for g in groups],
               "device": [g["lr"].device.type if isinstance(g["lr"], torch.Tensor) else "number" for g in groups],
               "made": all(g["lr"] is m for g, m in zip(groups, self.made))}
        out = self.inner(*batch)
        row["graph"] = self.inner.graph is not None
        with open(self.record, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return out

    def release(self) -> None:
        self.inner.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("params", "data", "init", "where", "record"):
        parser.add_argument(name)
    parser.add_argument("--signal", choices=["INT", "KILL"])
    parser.add_argument("--at", type=int)
    args = parser.parse_args()

    import samba.train
    from samba.cli import run_stage
    from samba.config import load_params

    made = samba.train.Trainer.__init__

    def __init__(self, *a, **k):
        made(self, *a, **k)
        self.step_fn = StepProbe(self, Path(args.record), args.signal and getattr(signal, f"SIG{args.signal}"),
                                 args.at)

    samba.train.Trainer.__init__ = __init__
    where = Path(args.where)
    run_stage("train", lambda: samba.train.train(load_params(args.params), args.data, args.init, where / "out",
                                                 where / "metrics", where / "ckpt"))


# ----------------------------------------------------------------------------- the check

def run_probed(params: dict, project: Path, where: Path, signal_name: str | None = None,
               at: int | None = None) -> tuple[int, list[dict], str]:
    """The train stage on ``project``'s data and init, in a process of its own: its exit code,
    its probe's rows, its stderr."""
    import yaml

    from conftest import tool_env

    where.mkdir(parents=True, exist_ok=True)
    (where / "params.yaml").write_text(yaml.safe_dump(params))
    record = where / f"steps-{len(list(where.glob('steps-*')))}.jsonl"
    cmd = [sys.executable, __file__, str(where / "params.yaml"), str(project / "data"), str(project / "init"),
           str(where), str(record)] + (["--signal", signal_name, "--at", str(at)] if signal_name else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), timeout=900)
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return proc.returncode, rows, proc.stderr


def check_steps(rows: list[dict], start: int, stop: int, total: int, t, graphs: bool) -> None:
    """Steps ``start`` to ``stop`` of a run of ``total`` (0-based, stop excluded) once, each with the schedule's learning rate, read
    from the optimizer's own groups; under graphs a CUDA tensor, the one make_optimizer made
    (so the one the captured step reads), and the steps after the warm-up replayed."""
    import pytest

    from samba.train import lr_factor

    assert [r["call"] for r in rows] == list(range(stop - start)), "each step once"
    for r in rows:
        step = start + r["call"]
        want = t.lr * lr_factor(step, t.warmup_steps, total, t.min_lr_ratio)
        assert r["lr"] == pytest.approx([want] * len(r["lr"]), rel=1e-6), f"learning rate of step {step}"
        if graphs:
            assert r["device"] == ["cuda"] * len(r["lr"]) and r["made"], f"step {step}: {r}"
    assert [r["graph"] for r in rows] == [graphs and r["call"] >= WARMUP for r in rows], "captured after the warm-up"


def run_straight(params: dict, project: Path, where: Path) -> Path:
    """An uninterrupted run into ``where``, each of its steps checked (``check_steps``); returns
    ``where``."""
    from samba.config import Params
    from samba.cuda_graphs import graphs_wanted
    from samba.runtime import resolve_device

    checked = Params.from_dict(params, require_all=True)
    t, graphs = checked.training, graphs_wanted(checked.compute.cuda_graphs, resolve_device(checked.compute))
    code, rows, err = run_probed(params, project, where)
    assert code == 0, err[-3000:]
    check_steps(rows, 0, t.max_steps, t.max_steps, t, graphs)
    return where


def worst_weight_error(a: Path, b: Path) -> tuple[str, float]:
    """The weight of run ``b`` farthest from run ``a``'s (relative error; a tensor that is 0 in
    ``a`` counts 1 unless equal) and that error."""
    from safetensors.torch import load_file

    from conftest import relative_error

    wa, wb = load_file(a / "out/model.safetensors"), load_file(b / "out/model.safetensors")
    assert wa.keys() == wb.keys()
    errors = {k: relative_error(wb[k], wa[k]) if wa[k].norm() > 0 else float(not torch.equal(wa[k], wb[k]))
              for k in wa}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def check_interrupted_run_resumes_exactly(params: dict, project: Path, where: Path, signal_name: str,
                                          at: int, straight: Path | None = None, tolerance: float = 1e-6) -> None:
    """Run uninterrupted (or take ``straight``, such a run of the same params); run again, stopped
    by ``signal_name`` after launching step ``at``; run once more to resume. The resumed run ends
    at the uninterrupted weights (relative error below ``tolerance``) and every run's every step
    used the schedule's learning rate."""
    from samba.config import Params
    from samba.cuda_graphs import graphs_wanted
    from samba.runtime import resolve_device

    checked = Params.from_dict(params, require_all=True)
    t, graphs = checked.training, graphs_wanted(checked.compute.cuda_graphs, resolve_device(checked.compute))
    total = t.max_steps
    if straight is None:
        straight = run_straight(params, project, where / "straight")

    code, rows, err = run_probed(params, project, where / "interrupted", signal_name, at)
    assert code == {"INT": 130, "KILL": -signal.SIGKILL}[signal_name], err[-3000:]
    check_steps(rows, 0, at, total, t, graphs)
    checkpoint = where / "interrupted/ckpt/last.pt"
    step = torch.load(checkpoint, weights_only=True)["step"]
    # Ctrl-C: the step completes and is saved; kill -9: back to the last periodic checkpoint
    assert step == (at if signal_name == "INT" else (at - 1) // t.checkpoint_every * t.checkpoint_every) > 0
    assert not (where / "interrupted/out").exists()

    code, rows, err = run_probed(params, project, where / "interrupted")
    assert code == 0 and f"resuming from {checkpoint} at step {step} of {total}" in err, err[-3000:]
    check_steps(rows, step, total, total, t, graphs)
    worst, error = worst_weight_error(straight, where / "interrupted")
    print(f"{signal_name} after step {at}, resumed at {step}: worst weight relative error {error:.2e} ({worst}); "
          f"bound {tolerance:.2e}")
    assert error < tolerance, worst


if __name__ == "__main__":
    main()
