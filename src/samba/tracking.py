"""Where training metrics go: dvclive always, Weights & Biases too when ``logging.use_wandb``
(its run's config is the whole of params.yaml, which DVC tracks for dvclive's side).

dvclive never writes a dvc.yaml here (the pipeline declares metrics and plots). The train
stage logs into a directory beside its checkpoint and moves it into place when the run
completes (``train``), so an interrupted or failed run leaves the earlier metrics as they were.
Every logged row is also kept in memory and saved in the resumable checkpoint; a resumed run
starts a fresh dvclive directory and writes those rows again first, so the curves hold every
logged step exactly once.
"""

from __future__ import annotations

from pathlib import Path

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
