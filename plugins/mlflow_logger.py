"""The `mlflow` logger: one MLflow run per maeframe run, continued by `maeframe run --resume`.

It logs the resolved recipe as parameters (dotted field paths), every metrics.jsonl line as metrics at its
step, the reconstruction pictures and a downstream run's results.json as artifacts (`reconstructions/`,
`results/`), and the end status (FINISHED, FAILED, KILLED for a stopped run). It talks to the store through
`MlflowClient` (no process-wide active run), so several runs in one process never mix.

Needs `pip install 'maeframe[mlflow]'`: mlflow-skinny (enough for a tracking server, `http://...`) plus
SQLAlchemy and Alembic for a local `sqlite:///` store.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from maeframe import MaeframeError, Options, RunLogger, RunStart, hookimpl

STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # tracking URI schemes served by SQLAlchemy


class MLflowOptions(Options):
    tracking_uri: str | None = Field(None, description="the tracking store: a server (http://host:5000), a local "
                                                       "database (sqlite:///runs/mlflow.db), databricks, ...; null "
                                                       "= MLFLOW_TRACKING_URI, else MLflow's default")
    experiment: str = Field("maeframe", description="experiment name; created when the store has none of it")
    artifact_location: str | None = Field(None, description="where a newly created experiment keeps artifacts "
                                                            "(a path or URI); null = the store's default (for a "
                                                            "sqlite store: ./mlruns in the working directory)")
    run_name: str | None = Field(None, description="the MLflow run's name; null = the recipe's name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags of the run, e.g. {team: vision}")


class MLflowLogger(RunLogger):
    """An MLflow run: recipe as params, metrics at their steps, pictures and results.json as artifacts."""

    Options = MLflowOptions
    requires = ("mlflow",)
    install = "maeframe[mlflow]"

    def __init__(self, options: MLflowOptions):
        super().__init__(options)
        self.run_id: str | None = None
        self.logged_until = -1  # on a resume: the last step the store already holds (not logged again)

    def missing(self) -> list[str]:
        """mlflow, and for a database store (sqlite:///...) SQLAlchemy and Alembic, which mlflow-skinny lacks."""
        scheme = (self.options.tracking_uri or "").partition(":")[0].partition("+")[0]
        database = ("sqlalchemy", "alembic") if scheme in DATABASES else ()
        return super().missing() + [name for name in database if importlib.util.find_spec(name) is None]

    def start(self, run: RunStart) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.options.tracking_uri)
        params = {key: value if isinstance(value, str) else json.dumps(value) for key, value in run.params.items()}
        if self.run_id is None:
            self.run_id = self._create(run)
            self._log_params(params)
            return
        found = self.client.get_run(self.run_id)  # an MlflowException when this store does not hold it
        if found.info.lifecycle_stage == "deleted":
            raise MaeframeError(f"MLflow run {self.run_id} was deleted; restore it (mlflow runs restore) to resume")
        self.client.update_run(self.run_id, status="RUNNING")
        self.logged_until = max((m.step for key in found.data.metrics
                                 for m in self.client.get_metric_history(self.run_id, key)), default=-1)
        old = found.data.params  # MLflow parameters cannot change: a resumed run's changes get their own keys
        new = {key: value for key, value in params.items() if key not in old}
        new.update({f"resumed_step{run.resume_step}.{key}": value for key, value in params.items()
                    if key in old and old[key] != value})
        self._log_params(new)

    def _create(self, run: RunStart) -> str:
        experiment = self.client.get_experiment_by_name(self.options.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(self.options.experiment, self.options.artifact_location))
        tags = {"maeframe.task": run.task, "maeframe.run_dir": str(Path(run.run_dir).resolve()), **self.options.tags}
        created = self.client.create_run(experiment_id, tags=tags, run_name=self.options.run_name or run.name)
        return created.info.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in params.items()])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_until:  # logged before the crash this run resumes from (same values)
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def log_files(self, step: int, paths: list[Path], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUS[status])

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


@hookimpl
def register_loggers(register):
    register("mlflow", MLflowLogger)
