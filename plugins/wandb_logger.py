"""The `wandb` logger: one Weights & Biases run per maeframe run, continued by `maeframe run --resume`.

It logs the resolved recipe as the run's config (dotted field paths), every metrics.jsonl line at its step,
the reconstruction pictures as media (images; a tokenizer's sounds as audio) and a downstream run's
results.json as an artifact with its numbers as metrics, and the end status (exit code 0, 1, or 75 for a
stopped run, which is also marked preempting). `mode: offline` writes everything under `dir` for a later
`wandb sync`; nothing reaches the network.

Needs `pip install 'maeframe[wandb]'`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from maeframe import Options, RunLogger, RunStart, hookimpl

EXIT_CODE = {"finished": 0, "failed": 1, "stopped": 75}
IMAGES = (".png", ".jpg", ".jpeg", ".gif")
SOUNDS = (".wav", ".flac", ".ogg", ".mp3")


class WandbOptions(Options):
    project: str = Field("maeframe", description="the W&B project")
    entity: str | None = Field(None, description="team or user that owns the project; null = your default entity")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to the server; offline: write files under `dir` for `wandb sync`; "
                              "disabled: log nothing (the calls still run)")
    dir: str | None = Field(None, description="where wandb keeps its files (a wandb/ folder inside it); null = the "
                                              "run directory")
    run_name: str | None = Field(None, description="the W&B run's display name; null = the recipe's name")
    tags: list[str] = Field(default_factory=list, description="tags of the run")


class WandbLogger(RunLogger):
    """A W&B run: recipe as config, metrics at their steps, pictures as media, results.json as an artifact."""

    Options = WandbOptions
    requires = ("wandb",)
    install = "maeframe[wandb]"

    def __init__(self, options: WandbOptions):
        super().__init__(options)
        self.run_id: str | None = None

    def start(self, run: RunStart) -> None:
        import wandb

        folder = Path(self.options.dir).expanduser() if self.options.dir else Path(run.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        resuming = self.run_id is not None
        self.run = wandb.init(project=self.options.project, entity=self.options.entity, mode=self.options.mode,
                              dir=str(folder), name=self.options.run_name or run.name, tags=self.options.tags,
                              job_type=run.task, id=self.run_id, resume="must" if resuming else None,
                              config=None if resuming else run.params)
        if resuming:  # a resumed run may change fields that leave its trajectory alone (resume_check)
            self.run.config.update(run.params, allow_val_change=True)
        self.run_id = self.run.id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_files(self, step: int, paths: list[Path], folder: str) -> None:
        import wandb

        media: dict[str, Any] = {}
        images = [wandb.Image(str(path)) for path in paths if path.suffix.lower() in IMAGES]
        sounds = [wandb.Audio(str(path)) for path in paths if path.suffix.lower() in SOUNDS]
        if images:
            media[folder] = images
        if sounds:
            media[f"{folder}/audio"] = sounds
        if media:
            self.run.log(media, step=step)
        others = [path for path in paths if path.suffix.lower() not in IMAGES + SOUNDS]
        if others:
            artifact = wandb.Artifact(f"{self.run.id}-{folder}", type=folder)
            for path in others:
                artifact.add_file(str(path), name=f"{folder}/{path.name}")
            self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        if status == "stopped":
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_CODE[status])

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


@hookimpl
def register_loggers(register):
    register("wandb", WandbLogger)
