"""The run directory: resolved recipe, run facts, metrics.jsonl and TensorBoard events."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..errors import MaeframeError


class RunDirectory:
    """`<output_dir>/<name>/`. A directory that already holds a run is only reused by a resume.
    Only the main process creates and writes it."""

    def __init__(self, root: str | Path, resume: bool, is_main: bool = True):
        self.path = Path(root)
        self.last = self.path / "last.pt"
        if resume and not self.last.is_file():
            raise MaeframeError(f"--resume: {self.last} does not exist")
        if not resume and (self.last.is_file() or (self.path / "metrics.jsonl").is_file()):
            raise MaeframeError(f"{self.path} already holds a run; pass --resume to continue it, or set "
                                f"another name (e.g. `name=other`)")
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    def periodic(self, epoch: int) -> Path:
        return self.path / f"checkpoint-epoch{epoch:04d}.pt"

    def periodic_checkpoints(self) -> list[Path]:
        """Periodic checkpoints, oldest first."""
        return sorted(self.path.glob("checkpoint-epoch*.pt"))

    def write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.path / name)


class MetricsLog:
    """Appends one JSON object per logging interval to metrics.jsonl and mirrors scalars to TensorBoard.

    On a resume from step S, lines and events after S (written before a crash, and about to be
    recomputed) are dropped first, so every step appears once."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        path = run_dir / "metrics.jsonl"
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self.file = open(path, "a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
