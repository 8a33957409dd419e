"""The run's experiment trackers (`runtime.loggers`): started, fed and closed by the engine on rank 0 only.

Every task drives them the same way: `start` before the first step (continuing the trackers' runs on a
resume), `log_metrics` with each metrics.jsonl line (`MetricsLog` forwards them), `log_files` with pictures,
`log_results` with a downstream run's results.json, and `closing()` around the run to report how it ended.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

from ..build import Prepared
from ..errors import MaeframeError
from ..recipe import flatten_tree
from ..run_logger import RunLogger, RunStart

log = logging.getLogger("maeframe.run")
RESULT_SECTIONS = ("final", "ema")  # the parts of results.json whose numbers are logged as metrics


class Trackers:
    """The recipe's loggers on the main process; none on the other ranks (their calls do nothing).

    `state_dict()` ({logger name: its state, e.g. the tracker's run id}) goes into every checkpoint and
    run.json; a resume hands it back with `load_state_dict` before `start`."""

    def __init__(self, prepared: Prepared, is_main: bool):
        self.recipe = prepared.recipe
        refs = self.recipe.runtime.loggers if is_main else []
        # fresh instances (validation built the recipe's own): a tracker's state belongs to this run alone
        entries = [prepared.registry.get("logger", ref.name) for ref in refs]
        self.loggers: list[tuple[str, RunLogger]] = [
            (f"runtime.loggers.{i} ({ref.name})", entry.cls(entry.cls.Options.model_validate(ref.options)))
            for i, (ref, entry) in enumerate(zip(refs, entries))]
        self.names = [ref.name for ref in refs]
        self.started: list[tuple[str, RunLogger]] = []

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: logger.state_dict() for name, (_, logger) in zip(self.names, self.loggers)}

    def load_state_dict(self, saved: dict[str, dict[str, Any]] | None) -> None:
        """Give each logger the state a checkpoint kept under its name (a logger added on resume starts anew)."""
        for name, (field, logger) in zip(self.names, self.loggers):
            if (saved or {}).get(name):
                self._call(field, "resuming", lambda: logger.load_state_dict(saved[name]))

    def start(self, run_dir: Path, resume_step: int | None) -> None:
        params = flatten_tree(self.recipe.model_dump(mode="json"))
        run = RunStart(Path(run_dir), self.recipe.name, self.recipe.task, params, resume_step)
        for field, logger in self.loggers:
            self._call(field, "starting its run", lambda: logger.start(run))
            self.started.append((field, logger))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        for field, logger in self.started:
            self._call(field, f"logging metrics at step {step}", lambda: logger.log_metrics(step, numbers))

    def log_files(self, step: int, paths: list[Path], folder: str) -> None:
        if paths:
            for field, logger in self.started:
                self._call(field, f"logging {folder} files", lambda: logger.log_files(step, list(paths), folder))

    def log_results(self, step: int, results: dict[str, Any], path: Path) -> None:
        """results.json as a file under "results", and its headline numbers (`final`, `ema`: top1, top5, mAP,
        loss) as metrics `final/top1`, ... at `step`; per-class values stay in the file."""
        numbers = {f"{section}/{key}": value for section in RESULT_SECTIONS
                   for key, value in (results.get(section) or {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.log_metrics(step, numbers)
        self.log_files(step, [Path(path)], "results")

    @contextlib.contextmanager
    def closing(self, stopped: tuple[type[BaseException], ...] = (KeyboardInterrupt,)):
        """Finish every started tracker with the run's status: "finished" when the block completes, "stopped"
        for the `stopped` exceptions (preemption, Ctrl-C: the run is meant to resume), "failed" otherwise.
        A tracker that fails to close while the run is failing is logged, not raised over the run's error."""
        try:
            yield self
        except BaseException as err:
            status = "stopped" if isinstance(err, stopped) else "failed"
            for field, logger in self.started:
                try:
                    logger.finish(status)
                except Exception as close_err:  # the run's own error is the one to report
                    log.warning("%s: could not mark its run %s: %s: %s", field, status, type(close_err).__name__,
                                close_err)
            raise
        for field, logger in self.started:
            self._call(field, "finishing its run", lambda: logger.finish("finished"))

    @staticmethod
    def _call(field: str, what: str, action: Callable[[], None]) -> None:
        """`action()`; a tracker's own exception becomes a MaeframeError naming its recipe field."""
        try:
            action()
        except MaeframeError:
            raise
        except Exception as err:
            raise MaeframeError(f"{field}: {what} failed: {type(err).__name__}: {err}") from err
