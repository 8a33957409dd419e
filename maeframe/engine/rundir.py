"""The run directory: resolved recipe, run facts and metrics.jsonl."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ..errors import MaeframeError, RecipeError
from .checkpoint import RUN_STATE, complete_dcp
from .tracking import Trackers


CHECKPOINT_SUFFIXES = (".pt", ".dcp")  # one file (ddp) or a DCP directory (fsdp)
RUN_FILES = ("metrics.jsonl", "results.json")  # a directory holding one of these holds a run
log = logging.getLogger("maeframe.run")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The `last` checkpoint to resume from, in either format: the one written last when both exist
    (a run that changed strategy), `.last.dcp.old/` when a crash interrupted the swap of `last.dcp/`."""
    run_dir = Path(run_dir)
    found = [(path.stat().st_mtime, path) for path in [run_dir / "last.pt"] if path.is_file()]
    sharded = complete_dcp(run_dir / "last.dcp")
    if sharded is not None:
        found.append(((sharded / RUN_STATE).stat().st_mtime, sharded))
    return max(found)[1] if found else None


class RunDirectory:
    """`<output_dir>/<name>/`. A directory that already holds a run is only reused by a resume. Only the main
    process creates and writes it. `suffix` is the checkpoint format this run writes: `.pt` (one file) or
    `.dcp` (a sharded directory); a resume reads either.

    `resume`: False starts a new run (refused where one exists), True continues the run's `last` checkpoint,
    "auto" (a requeued job) continues it when there is one, else starts afresh, first moving a dead attempt's
    files (a run that stopped before its first checkpoint) aside into `failed-attempt-N/`. `resuming` tells
    which happened."""

    def __init__(self, root: str | Path, resume: bool | str, is_main: bool = True, suffix: str = ".pt"):
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"checkpoint suffix {suffix!r} is not one of {CHECKPOINT_SUFFIXES}")
        self.path = Path(root)
        self.suffix = suffix
        self.last = self.path / f"last{suffix}"
        self.best = self.path / f"best{suffix}"
        self.resume_from = latest_checkpoint(self.path)
        dead = self.resume_from is None and self.holds_run_files()
        self.resuming = self.resume_from is not None and bool(resume)
        if resume is True and self.resume_from is None:
            raise MaeframeError(
                f"--resume: {self.path} holds a run that stopped before writing its first checkpoint: nothing to "
                f"resume. Pass --auto-resume to move that attempt aside and start again" if dead else
                f"--resume: there is no run at {self.path} to resume; run without --resume to start it")
        if not resume and (self.resume_from is not None or dead):
            raise MaeframeError(
                f"{self.path} already holds a run that stopped before its first checkpoint; pass --auto-resume to "
                f"move that attempt aside and start again, or set another name (e.g. `name=other`)" if dead else
                f"{self.path} already holds a run; pass --resume to continue it from {self.resume_from.name}, or "
                f"set another name (e.g. `name=other`)")
        if is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError, PermissionError) as err:
                raise RecipeError([("runtime.output_dir", f"cannot create the run directory {self.path}: "
                                                          f"{err.strerror or err}")]) from None
            if resume == "auto" and dead:
                self.set_attempt_aside()

    def holds_run_files(self) -> bool:
        return any((self.path / name).is_file() for name in RUN_FILES)

    def set_attempt_aside(self) -> Path:
        """Move everything but earlier attempts into the next `failed-attempt-N/` and return it."""
        number = 1 + max([int(p.name.rsplit("-", 1)[1]) for p in self.path.glob("failed-attempt-*")
                          if p.name.rsplit("-", 1)[1].isdigit()] or [0])
        aside = self.path / f"failed-attempt-{number}"
        aside.mkdir()
        for entry in self.path.iterdir():
            if entry != aside and not entry.name.startswith("failed-attempt-"):
                entry.rename(aside / entry.name)
        log.warning("%s: the previous attempt stopped before its first checkpoint; its files are in %s, "
                    "starting afresh", self.path, aside)
        return aside

    def latest(self) -> Path | None:
        """The checkpoint a resume would start from now, or None."""
        return latest_checkpoint(self.path)

    def stale_lasts(self) -> list[Path]:
        """The `last` checkpoint of the other format (and a DCP one set aside), stale once this run has
        written its own `last`."""
        if self.suffix == ".dcp":
            return [self.path / "last.pt"]
        return [self.path / "last.dcp", self.path / ".last.dcp.old"]

    def periodic(self, epoch: int) -> Path:
        return self.path / f"checkpoint-epoch{epoch:04d}{self.suffix}"

    def periodic_checkpoints(self) -> list[Path]:
        """Periodic checkpoints of both formats, oldest first."""
        found = [path for suffix in CHECKPOINT_SUFFIXES for path in self.path.glob(f"checkpoint-epoch*{suffix}")]
        return sorted(found, key=lambda path: path.name)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.path / name)


class MetricsLog:
    """Appends one JSON object per logging interval to metrics.jsonl and hands the same line, at the same
    step, to the run's experiment trackers (`Trackers`: TensorBoard, MLflow, ...).

    On a resume from step S, lines after S (written before a crash, and about to be recomputed) are dropped
    first, so every step appears once."""

    def __init__(self, run_dir: Path, trackers: Trackers, resume_step: int = 0):
        path = run_dir / "metrics.jsonl"
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self.file = open(path, "a", buffering=1)
        self.trackers = trackers

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self.trackers.log_metrics(step, metrics)

    def close(self) -> None:
        self.file.close()
