"""Experiment trackers (`runtime.loggers`): MLflow and W&B runs written to real local stores and read back.

One scenario feeds most tests: a tiny pretraining run logging to MLflow (a sqlite store) and W&B (offline)
crashes at step 3 after logging it (its last checkpoint is step 2), is resumed to the end, and a k-NN run
evaluates its checkpoint. The trackers must hold what the run directory holds, each step once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import read_run_state
from maeframe.engine.knn_eval import KnnTask
from maeframe.engine.loop import Preempted
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import RecipeError
from maeframe.recipe import flatten_tree, parse_recipe
from maeframe.recipe_file import read_recipe_tree
from conftest import QUICKSTART, RECIPES, tiny

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported: no usage reports
import mlflow  # noqa: E402  (the dev extra installs mlflow-skinny and wandb)
import mlflow.tracking as mlflow_tracking  # noqa: E402
from wandb.proto import wandb_internal_pb2 as wandb_proto  # noqa: E402

FAULT_PLUGIN = '''
import json, os, signal, uuid
from maeframe import RunLogger, hookimpl

@hookimpl
def log_metrics(step, metrics):  # after the line reached metrics.jsonl and the trackers
    if str(step) == os.environ.get("CRASH_AT_STEP"):
        raise RuntimeError(f"node lost at step {step}")
    if str(step) == os.environ.get("PREEMPT_AT_STEP"):  # a scheduler's SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

class Recorder(RunLogger):
    """A third party's tracker: one JSON line per call in <run dir>/recorder.jsonl; its state is a token."""
    token = None

    def state_dict(self):
        return {"token": self.token}

    def load_state_dict(self, state):
        self.token = state["token"]

    def start(self, run):
        self.token = self.token or uuid.uuid4().hex
        self.file = open(run.run_dir / "recorder.jsonl", "a")
        self.write("start", token=self.token, resume_step=run.resume_step, embed_dim=run.params["model.embed_dim"])

    def log_metrics(self, step, metrics):
        self.write("metrics", step=step, loss=metrics["loss"])

    def log_files(self, step, paths, folder):
        self.write("files", step=step, folder=folder, names=[path.name for path in paths])

    def finish(self, status):
        self.write("finish", status=status)
        self.file.close()

    def write(self, call, **fields):
        self.file.write(json.dumps({"call": call, **fields}) + "\\n")

@hookimpl
def register_loggers(register):
    register("recorder", Recorder)
'''
TIMING = {"img_s", "data_wait"}  # wall-clock metrics: a retraced step has values of its own
RETRACED_STEP = 3
KNN = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.train.options.limit=64",
       "data.eval.options.limit=32", "data.batch_size=16", "data.num_workers=0", "runtime.progress_bar=false"]


def quiet_env(root: Path) -> dict[str, str]:
    """Trackers write only under `root`: no telemetry, W&B's config, cache and artifact staging there."""
    return {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_SILENT": "true",
            **{f"WANDB_{kind}_DIR": str(root / "wandb-home" / kind.lower()) for kind in ("CONFIG", "CACHE", "DATA")}}


def loggers(root: Path, *extra: dict) -> str:
    """`runtime.loggers` override: MLflow in a sqlite store and W&B offline, both under `root`, then `extra`."""
    mlflow = {"name": "mlflow", "options": {"tracking_uri": f"sqlite:///{root}/mlflow.db",
                                            "artifact_location": str(root / "artifacts")}}
    wandb = {"name": "wandb", "options": {"mode": "offline", "dir": str(root / "wandb")}}
    return "runtime.loggers=" + json.dumps([mlflow, wandb, *extra])


@dataclass
class Scenario:
    root: Path
    run_dir: Path
    crashed: dict           # the MLflow run and the checkpoint right after the crash
    lines: list[dict]       # metrics.jsonl of the finished pretraining run
    knn_results: dict
    client: object          # MlflowClient of the store


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    root = tmp_path_factory.mktemp("trackers")
    (root / "fault_plugin.py").write_text(FAULT_PLUGIN)
    run_dir = root / "runs" / "quickstart"
    overrides = tiny(root / "runs", "plugins=[fault_plugin]", "runtime.checkpoint_every_steps=2",
                     loggers(root, {"name": "recorder"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        for key, value in quiet_env(root).items():
            patch.setenv(key, value)
        patch.setenv("CRASH_AT_STEP", "3")
        with pytest.raises(RuntimeError, match="node lost at step 3"):
            Pretrainer(prepare(QUICKSTART, overrides)).train()
        client = mlflow_tracking.MlflowClient(f"sqlite:///{root}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("maeframe").experiment_id])
        crashed = {"status": run.info.status, "run_id": run.info.run_id,
                   "checkpoint": torch.load(run_dir / "last.pt", weights_only=True)}
        patch.delenv("CRASH_AT_STEP")
        Pretrainer(prepare(QUICKSTART, overrides), resume=True).train()
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        knn = KnnTask(prepare(RECIPES / "knn_fmnist.yaml", [*KNN, f"runtime.output_dir={root / 'runs'}",
                                                           f"init.checkpoint={run_dir / 'last.pt'}", loggers(root)]))
        results = knn.train()
    sys.modules.pop("fault_plugin", None)
    return Scenario(root, run_dir, crashed, lines, results, client)


def mlflow_runs(s: Scenario) -> dict[str, object]:
    """{task tag: run} of the scenario's experiment."""
    runs = s.client.search_runs([s.client.get_experiment_by_name("maeframe").experiment_id])
    return {run.data.tags["maeframe.task"]: run for run in runs}


# --- MLflow ---------------------------------------------------------------------------------------

def test_mlflow_continues_one_run_across_the_crash_and_holds_metrics_jsonl(scenario):
    s = scenario
    assert s.crashed["status"] == "FAILED"
    assert s.crashed["checkpoint"]["step"] == 2 and s.crashed["checkpoint"]["loggers"]["mlflow"] == {
        "run_id": s.crashed["run_id"]}
    run = mlflow_runs(s)["pretrain"]
    assert run.info.run_id == s.crashed["run_id"] and run.info.status == "FINISHED"
    assert json.loads((s.run_dir / "run.json").read_text())["loggers"]["mlflow"]["run_id"] == run.info.run_id
    assert [line["step"] for line in s.lines] == list(range(1, 9))
    keys = {key for line in s.lines for key in line} - {"step", "time"}
    assert {"loss", "lr", "epoch", "img_s"} <= keys and keys <= set(run.data.metrics)
    for key in keys:  # step 3 was logged before the crash and not again after the resume
        history = sorted((m.step, m.value) for m in s.client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in history] == [line["step"] for line in s.lines if key in line], key
        retraced = (RETRACED_STEP,) if key in TIMING else ()  # the resumed run retraced step 3 at another speed
        assert [value for step, value in history if step not in retraced] == pytest.approx(
            [float(line[key]) for line in s.lines if key in line and line["step"] not in retraced], rel=1e-12), key


def test_mlflow_params_are_the_resolved_recipe(scenario):
    run = mlflow_runs(scenario)["pretrain"]
    recipe = yaml.safe_load((scenario.run_dir / "recipe.yaml").read_text())
    expected = {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in flatten_tree(recipe).items()}
    params = run.data.params
    assert {key: params[key] for key in expected} == expected
    assert params["model.embed_dim"] == "32" and params["runtime.loggers.0.name"] == "mlflow"
    # the resume changed no field, so no `resumed_step2.*` parameter was added
    assert set(params) == set(expected)


def test_mlflow_keeps_every_reconstruction_picture(scenario):
    run = mlflow_runs(scenario)["pretrain"]
    listed = [a.path for a in scenario.client.list_artifacts(run.info.run_id, "reconstructions")]
    assert listed == ["reconstructions/epoch0001.png", "reconstructions/epoch0002.png"]
    local = scenario.client.download_artifacts(run.info.run_id, "reconstructions/epoch0002.png",
                                               str(scenario.root / "download"))
    assert Path(local).read_bytes() == (scenario.run_dir / "reconstructions" / "epoch0002.png").read_bytes()


def test_mlflow_gets_a_knn_runs_results(scenario):
    run = mlflow_runs(scenario)["knn"]
    assert run.info.status == "FINISHED" and run.data.params["task"] == "knn"
    assert [a.path for a in scenario.client.list_artifacts(run.info.run_id, "results")] == ["results/results.json"]
    final = scenario.knn_results["final"]
    assert run.data.metrics["final/top1"] == pytest.approx(final["top1"]) and "final/top5" in run.data.metrics
    written = json.loads((scenario.root / "runs" / "knn_fmnist" / "results.json").read_text())
    assert written["final"]["top1"] == final["top1"]


# --- a third party's tracker ---------------------------------------------------------------------------

def test_a_third_party_tracker_gets_every_call_and_its_state_back(scenario):
    calls = [json.loads(line) for line in (scenario.run_dir / "recorder.jsonl").read_text().splitlines()]
    token = calls[0]["token"]
    assert scenario.crashed["checkpoint"]["loggers"]["recorder"] == {"token": token}
    metrics = lambda *steps: [{"call": "metrics", "step": step} for step in steps]  # noqa: E731
    pictures = lambda step, name: [{"call": "files", "step": step, "folder": "reconstructions",  # noqa: E731
                                    "names": [name]}]
    assert [{k: v for k, v in call.items() if k != "loss"} for call in calls] == [
        {"call": "start", "token": token, "resume_step": None, "embed_dim": 32}, *metrics(1, 2, 3),
        {"call": "finish", "status": "failed"},
        {"call": "start", "token": token, "resume_step": 2, "embed_dim": 32}, *metrics(3, 4),
        *pictures(4, "epoch0001.png"), *metrics(5, 6, 7, 8), *pictures(8, "epoch0002.png"),
        {"call": "finish", "status": "finished"}]
    losses = {call["step"]: call["loss"] for call in calls if call["call"] == "metrics"}
    assert losses == {line["step"]: line["loss"] for line in scenario.lines}


def test_a_preempted_fsdp_run_keeps_its_trackers_state_in_the_dcp_checkpoint(tmp_path, monkeypatch):
    """SIGTERM at step 2: the trackers are told "stopped", last.dcp/ keeps their state, --resume continues."""
    (tmp_path / "fault_plugin.py").write_text(FAULT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fault_plugin", raising=False)
    monkeypatch.setenv("PREEMPT_AT_STEP", "2")
    overrides = tiny(tmp_path, "plugins=[fault_plugin]", "runtime.strategy=fsdp", "runtime.max_steps=3",
                     "runtime.loggers=[recorder]")
    with pytest.raises(Preempted, match="at step 2"):
        Pretrainer(prepare(QUICKSTART, overrides)).train()
    run_dir = tmp_path / "quickstart"
    token = read_run_state(run_dir / "last.dcp")["loggers"]["recorder"]["token"]
    monkeypatch.delenv("PREEMPT_AT_STEP")
    Pretrainer(prepare(QUICKSTART, overrides), resume=True).train()
    calls = [json.loads(line) for line in (run_dir / "recorder.jsonl").read_text().splitlines()]
    assert [(c["call"], c.get("token"), c.get("resume_step"), c.get("step"), c.get("status")) for c in calls] == [
        ("start", token, None, None, None), ("metrics", None, None, 1, None), ("metrics", None, None, 2, None),
        ("finish", None, None, None, "stopped"),
        ("start", token, 2, None, None), ("metrics", None, None, 3, None), ("finish", None, None, None, "finished")]
    monkeypatch.delitem(sys.modules, "fault_plugin")


# --- Weights & Biases (offline) ---------------------------------------------------------------------

def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then the
    LevelDB log format: 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full,
    2 first, 3 middle, 4 last); a block's tail shorter than a header is padding."""
    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break  # zero-filled rest of the file
    return records


def wandb_runs(root: Path) -> dict[str, list[list]]:
    """{run id: [records of each offline-run directory, in order]}."""
    runs: dict[str, list[list]] = {}
    for folder in sorted((root / "wandb" / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        runs.setdefault(file.stem.removeprefix("run-"), []).append(wandb_records(file))
    return runs


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> dict[int, dict]:
    """{step: {key: value}}; a media entry (nested keys) becomes a mapping, e.g. row["reconstructions"]["_type"]."""
    rows: dict[int, dict] = {}
    for row in of_kind(records, "history"):
        values: dict = {}
        for item in row.item:
            *parents, leaf = [item.key] if item.key else list(item.nested_key)
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = json.loads(item.value_json)
        rows.setdefault(values.pop("_step"), {}).update(values)
    return rows


def config(records: list) -> dict:
    """The run's config: the run record's, then later updates (a resumed run sends its config as an update)."""
    items = [item for run in of_kind(records, "run") for item in run.config.update]
    items += [item for update in of_kind(records, "config") for item in update.update]
    return {item.key: json.loads(item.value_json) for item in items}


def test_wandb_offline_resumes_the_same_run_and_holds_metrics_jsonl(scenario):
    runs = wandb_runs(scenario.root)
    pretrain_id = scenario.crashed["checkpoint"]["loggers"]["wandb"]["run_id"]
    assert len(runs[pretrain_id]) == 2  # the crashed attempt and the resumed one, one run id
    crashed, resumed = runs[pretrain_id]
    assert [e.exit_code for e in of_kind(crashed, "exit")] == [1] and [e.exit_code for e in of_kind(resumed, "exit")] == [0]
    assert of_kind(crashed, "run")[0].run_id == of_kind(resumed, "run")[0].run_id == pretrain_id
    before, after = history(crashed), history(resumed)
    assert sorted(before) == [1, 2, 3] and sorted(after) == list(range(3, 9))  # step 3 again, same numbers
    for line in scenario.lines:
        logged = {**before, **after}[line["step"]]
        assert {k: logged[k] for k in line if k not in ("step", "time")} == pytest.approx(
            {k: v for k, v in line.items() if k not in ("step", "time")}, rel=1e-6)
    assert before[3]["loss"] == pytest.approx(after[3]["loss"], rel=1e-6)
    pictures = {step: row["reconstructions"] for step, row in after.items() if "reconstructions" in row}
    assert sorted(pictures) == [4, 8] and pictures[8]["_type"] == "images/separated" and pictures[8]["count"] == 1
    (folder,) = [f for f in sorted((scenario.root / "wandb" / "wandb").glob(f"offline-run-*-{pretrain_id}"))][1:]
    assert (folder / "files" / pictures[8]["filenames"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = flatten_tree(yaml.safe_load((scenario.run_dir / "recipe.yaml").read_text()))
    for attempt in (crashed, resumed):  # the new run's config, and the same again as the resumed run's update
        assert {key: config(attempt)[key] for key in recipe} == recipe


def test_wandb_offline_gets_a_knn_runs_results(scenario):
    (knn,) = [attempts[0] for attempts in wandb_runs(scenario.root).values() if len(attempts) == 1]
    (row,) = history(knn).values()
    assert row["final/top1"] == pytest.approx(scenario.knn_results["final"]["top1"])
    (artifact,) = of_kind(knn, "artifact")
    assert artifact.type == "results" and [e.path for e in artifact.manifest.contents] == ["results/results.json"]


# --- validation ---------------------------------------------------------------------------------------

def test_a_missing_tracker_package_is_a_recipe_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    base = [str(QUICKSTART), "--set", f"runtime.output_dir={out}"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    assert main(["validate", *base, "--set", "runtime.loggers=[tensorboard, mlflow]"]) == 2
    assert ("runtime.loggers.1: mlflow is not installed (logger mlflow needs it); pip install 'maeframe[mlflow]'"
            in capsys.readouterr().err)
    assert main(["run", str(QUICKSTART), f"runtime.output_dir={out}", "runtime.loggers=[wandb, mlflow]"]) == 2
    assert "runtime.loggers.1: mlflow is not installed" in capsys.readouterr().err and not out.exists()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)  # installed, but not the database store
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    sqlite = "runtime.loggers=[{name: mlflow, options: {tracking_uri: 'sqlite:///x.db'}}]"
    assert main(["validate", *base, "--set", sqlite]) == 2
    assert "runtime.loggers.0: sqlalchemy is not installed (logger mlflow needs it)" in capsys.readouterr().err


def test_logger_entries_are_checked_at_their_field_paths(tmp_path):
    cases = [("runtime.loggers=[mlflow, tensorboard, mlflow]", "runtime.loggers.2",
              "mlflow is already runtime.loggers.0; list each tracker once"),
             ("runtime.loggers=[tensorboard, {name: wandb, options: {mode: sometimes}}]",
              "runtime.loggers.1.options.mode", "Input should be 'online', 'offline' or 'disabled'"),
             ("runtime.loggers=[tensorboard, clearml]", "runtime.loggers.1.name", "unknown logger 'clearml'"),
             ("runtime.tensorboard=maybe", "runtime.tensorboard", "must be true or false, got 'maybe'")]
    for override, path, message in cases:
        with pytest.raises(RecipeError) as info:
            prepare(RECIPES / "image_mae_vitb.yaml", [override])
        problems = dict(info.value.problems)
        assert message in problems[path], (override, problems)


def test_runtime_tensorboard_keeps_its_meaning_and_loggers_decide(caplog):
    """Every recipe under recipes/ validates as before (`tensorboard: true` = loggers [tensorboard], false =
    none); given `loggers` decide, and a `tensorboard` that disagrees is named in a warning. The resolved
    recipe has loggers only."""
    for path in sorted(RECIPES.rglob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        flag = tree.get("runtime", {}).get("tensorboard", True)
        recipe = parse_recipe(tree, str(path))
        assert [ref.name for ref in recipe.runtime.loggers] == (["tensorboard"] if flag else []), path
        assert "tensorboard" not in recipe.runtime.model_dump()
    knn = RECIPES / "knn_fmnist.yaml"  # says tensorboard: false, as quickstart.yaml says true
    cases = [(QUICKSTART, ["runtime.loggers=[mlflow]"], ["mlflow"], "true is ignored: runtime.loggers ['mlflow']"),
             (QUICKSTART, ["runtime.loggers=[mlflow]", "runtime.tensorboard=false"], ["mlflow"], None),
             (knn, ["runtime.loggers=[tensorboard, wandb]"], ["tensorboard", "wandb"], "false is ignored"),
             (knn, ["runtime.loggers=[wandb]"], ["wandb"], None),
             (QUICKSTART, ["runtime.tensorboard=false"], [], None)]
    for path, overrides, names, warning in cases:
        caplog.clear()
        recipe = parse_recipe(read_recipe_tree(path, overrides))
        assert [ref.name for ref in recipe.runtime.loggers] == names, overrides
        warned = [r.getMessage() for r in caplog.records if r.name == "maeframe.recipe"]
        assert (warning in warned[0] and len(warned) == 1) if warning else not warned, (overrides, warned)


# --- under torchrun -----------------------------------------------------------------------------------

def test_only_rank_zero_logs_under_torchrun(tmp_path):
    """Two gloo processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; without the
    launcher's own torch import): one MLflow run with each step once; the other rank created nothing."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = json.dumps([{"name": "mlflow", "options": {"tracking_uri": uri,
                                                          "artifact_location": str(tmp_path / "artifacts")}}])
    command = [sys.executable, "-m", "maeframe", "run", str(QUICKSTART),
               *tiny(tmp_path, "data.batch_size=8", "runtime.max_steps=2", "runtime.threads=1",
                     f"runtime.loggers={tracker}")]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = {**os.environ, **quiet_env(tmp_path), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**world, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    for process in ranks:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    client = mlflow_tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("maeframe").experiment_id])
    lines = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [line["loss"] for line in lines]
    assert run.info.status == "FINISHED" and run.data.params["runtime.loggers.0.name"] == "mlflow"
    assert not (tmp_path / "mlruns").exists()  # no process fell back to a default store in the working directory
