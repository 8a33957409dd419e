"""The `tensorboard` logger: every metrics.jsonl line as TensorBoard scalars under <run dir>/tensorboard/.

The default of `runtime.loggers`. Scalars only: pictures and results.json stay files of the run directory.
A resume from step S drops the events logged after S (TensorBoard's purge_step), as metrics.jsonl does.
"""
from __future__ import annotations

from pathlib import Path

from maeframe import RunLogger, RunStart, hookimpl


class TensorBoardLogger(RunLogger):
    """Event files in <run dir>/tensorboard/ (`tensorboard --logdir runs` shows every run); no options."""

    requires = ("tensorboard",)
    install = "tensorboard"

    def start(self, run: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run.run_dir) / "tensorboard"), purge_step=run.resume_step or None)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, status: str) -> None:
        self.writer.close()


@hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger)
