"""Every `runtime.*` and `data.*` field means the same thing in every task: each field, run through each
task, has its documented effect there, or the recipe refuses it (naming the field) where the task has no
use for it. One small run per task with every field set away from its default; each test reads one field."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from maeframe.build import prepare
from maeframe.engine.data import SeededDataset
from maeframe.engine.distributed import shutdown_world
from maeframe.engine.loop import Trainer
from maeframe.engine.run import make_task
from maeframe.errors import RecipeError
from maeframe.recipe import UNUSED_RUNTIME_FIELDS, DataConfig, RuntimeConfig
from conftest import QUICKSTART, RECIPES

TASKS = ["pretrain", "finetune", "linprobe", "knn"]
RECIPE = {"pretrain": QUICKSTART, "finetune": RECIPES / "finetune_fmnist.yaml",
          "linprobe": RECIPES / "linprobe_fmnist.yaml", "knn": RECIPES / "knn_fmnist.yaml"}
SIZES = {"pretrain": ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
                      "model.decoder_depth=1", "model.decoder_num_heads=2", "monitor=null"],
         "finetune": ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "init.format=none"]}
SIZES["linprobe"] = SIZES["knn"] = SIZES["finetune"]
DATA = ["data.train.options.limit=64", "data.batch_size=8", "data.num_workers=1", "data.pin_memory=false",
        "data.persistent_workers=false", "data.prefetch_factor=3", "data.max_bad_fraction=0.5"]
# 64 samples / (8 × 2 accumulation) = 4 steps per epoch, 3 epochs, stopped at step 10
TRAINING = ["optim.epochs=3", "optim.warmup_epochs=1", "optim.accum_steps=2", "runtime.max_steps=10",
            "runtime.log_interval=2", "runtime.checkpoint_interval=1", "runtime.checkpoint_every_steps=3",
            "runtime.keep_checkpoints=1", "runtime.nonfinite=skip", "runtime.visualize_interval=2",
            "runtime.visualize_samples=3"]
COMMON = ["runtime.loggers=[tensorboard]", "runtime.progress_bar=false", "runtime.threads=1", "runtime.device=cpu",
          "runtime.precision=fp32"]
NAN_STEP = 4


@dataclass
class Ran:
    task: str
    run: object
    run_dir: Path
    saves: list[tuple[str, int]]
    lines: list[dict]
    stderr: str


def overrides(task: str, out: Path) -> list[str]:
    training = [] if task == "knn" else TRAINING
    if task != "pretrain":  # downstream tasks draw no pictures: their recipes refuse these fields
        training = [o for o in training if not o.startswith("runtime.visualize")]
    if task == "knn":
        data = [o for o in DATA if not o.startswith("data.max_bad")]
    else:
        data = DATA
    evaluation = [] if task == "pretrain" else ["data.eval.options.limit=16"]
    return [*SIZES[task], *data, *evaluation, *training, *COMMON, f"runtime.output_dir={out}"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, request) -> dict[str, Ran]:
    done = {}
    patch = pytest.MonkeyPatch()
    real_get, real_save = SeededDataset.__getitem__, Trainer.save
    # every 4th sample reports one unreadable file before it (20 %, under data.max_bad_fraction=0.5)
    patch.setattr(SeededDataset, "__getitem__", lambda self, item: (*real_get(self, item)[:2], int(item[0] % 4 == 0)))
    saves: list[tuple[str, int]] = []
    patch.setattr(Trainer, "save", lambda self, path: (saves.append((path.name, self.step)), real_save(self, path)))
    for task in TASKS:
        out = tmp_path_factory.mktemp(task)
        run = make_task(prepare(RECIPE[task], overrides(task, out)))
        if task != "knn":  # a NaN loss at one step: runtime.nonfinite=skip skips and counts it
            real_losses = run.train_step.losses
            run.train_step.losses = lambda i, l, step, m, real=real_losses: (
                (lambda total, terms: (total * float("nan") if step == NAN_STEP else total, terms))(*real(i, l, step, m)))
        saves.clear()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            run.train()
        run_dir = out / run.prepared.recipe.name
        metrics = run_dir / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        done[task] = Ran(task, run, run_dir, list(saves), lines, stderr.getvalue())
    patch.undo()
    return done


def losses(ran: Ran) -> list[dict]:
    return [line for line in ran.lines if "loss" in line]


# --- one check per field: what it means, in every task that uses it ---------------------------------------

def check_log_interval(r: Ran):
    assert [line["step"] for line in losses(r)] == [2, 4, 6, 8, 10]


def check_checkpoint_interval(r: Ran):
    assert ("checkpoint-epoch0001.pt", 4) in r.saves and ("checkpoint-epoch0002.pt", 8) in r.saves


def check_checkpoint_every_steps(r: Ran):
    assert [step for name, step in r.saves if name == "last.pt" and step % 4] == [3, 6, 9, 10]


def check_keep_checkpoints(r: Ran):
    assert sorted(p.name for p in r.run_dir.glob("checkpoint-epoch*")) == ["checkpoint-epoch0002.pt"]


def check_max_steps(r: Ran):
    assert r.run.step == 10 and losses(r)[-1]["step"] == 10 and torch.load(
        r.run_dir / "last.pt", weights_only=True)["step"] == 10


def check_nonfinite(r: Ran):
    assert losses(r)[-1]["nonfinite_steps"] == 1 and int(r.run.train_step.first_nonfinite) == NAN_STEP


def check_visualize_interval(r: Ran):
    assert sorted(p.name for p in (r.run_dir / "reconstructions").iterdir()) == ["epoch0002.png"]


def check_visualize_samples(r: Ran):
    from PIL import Image

    height = Image.open(r.run_dir / "reconstructions" / "epoch0002.png").height
    assert height == 3 * (112 + 2) + 2  # three rows of 28² images enlarged to 112², 2-pixel padding


def check_loggers(r: Ran):
    """Every task feeds its trackers: training tasks their metrics lines, k-NN its results' numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(r.run_dir / "tensorboard")).Reload().Tags()["scalars"]
    expected = {"pretrain": {"loss"}, "finetune": {"loss", "final/top1"}, "linprobe": {"loss", "final/top1"},
                "knn": {"final/top1"}}[r.task]
    assert expected <= set(scalars), scalars


def check_progress_bar(r: Ran):
    assert "step/s" not in r.stderr and "%|" not in r.stderr


def check_threads(r: Ran):
    assert torch.get_num_threads() == 1


def check_device(r: Ran):
    assert r.run.runtime.device == torch.device("cpu")


def check_precision(r: Ran):
    assert r.run.runtime.precision == "fp32"


def check_output_dir(r: Ran):
    assert r.run_dir.parent == Path(r.run.recipe.runtime.output_dir) and (r.run_dir / "recipe.yaml").is_file()


def check_batch_size(r: Ran):
    if r.task == "knn":
        assert json.loads((r.run_dir / "results.json").read_text())["dataset"]["train"] == 64
    else:
        assert r.run.effective_batch == 16 and r.run.steps_per_epoch == 4


def check_loader(field: str, expected):
    def check(r: Ran):
        if r.task == "knn":
            pytest.skip("k-NN reads its data in one pass with data.num_workers processes; the other loader "
                        "settings shape the training loader")
        loader = r.run.loader
        assert getattr(loader, field) == expected, (field, getattr(loader, field))
    return check


def check_max_bad_fraction(r: Ran):
    seen = losses(r)[-1]["bad_samples"]
    assert 0 < seen and r.run.samples.bad == seen and r.run.samples.limit == 0.5


CHECKS = {
    "runtime.log_interval": check_log_interval, "runtime.checkpoint_interval": check_checkpoint_interval,
    "runtime.checkpoint_every_steps": check_checkpoint_every_steps, "runtime.keep_checkpoints": check_keep_checkpoints,
    "runtime.max_steps": check_max_steps, "runtime.nonfinite": check_nonfinite,
    "runtime.visualize_interval": check_visualize_interval, "runtime.visualize_samples": check_visualize_samples,
    "runtime.loggers": check_loggers, "runtime.progress_bar": check_progress_bar,
    "runtime.threads": check_threads, "runtime.device": check_device, "runtime.precision": check_precision,
    "runtime.output_dir": check_output_dir, "data.batch_size": check_batch_size,
    "data.num_workers": check_loader("num_workers", 1), "data.pin_memory": check_loader("pin_memory", False),
    "data.persistent_workers": check_loader("persistent_workers", False),
    "data.prefetch_factor": check_loader("prefetch_factor", 3), "data.max_bad_fraction": check_max_bad_fraction,
}
# checked by building, not training: compiling and sharding are slow on a CPU and covered elsewhere
BUILT = {"runtime.compile", "runtime.compile_mode", "runtime.strategy"}
KNN_SKIPS_BAD_FILES = {"data.max_bad_fraction"}  # k-NN reads each file once and has no bad-sample budget yet


def test_every_field_has_a_check():
    fields = {f"runtime.{n}" for n in RuntimeConfig.model_fields} | {f"data.{n}" for n in DataConfig.model_fields}
    assert fields - {"data.train", "data.eval"} == set(CHECKS) | BUILT


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("field", sorted(CHECKS))
def test_a_field_means_the_same_in_every_task(ran, field, task):
    name = field.split(".", 1)[1]
    if field.startswith("runtime.") and name in UNUSED_RUNTIME_FIELDS.get(task, ()):
        value = {"nonfinite": "skip", "compile_mode": "max-autotune"}.get(name, 7)
        with pytest.raises(RecipeError, match=rf"runtime\.{name}"):
            prepare(RECIPE[task], [*SIZES[task], f"runtime.{name}={value}"])
        return
    if task == "knn" and field in KNN_SKIPS_BAD_FILES:
        pytest.skip("k-NN reads each file once and has no bad-sample budget yet")
    CHECKS[field](ran[task])


@pytest.mark.parametrize("task", TASKS)
def test_compile_and_strategy_are_read_by_every_task(tmp_path, task):
    if "compile" in UNUSED_RUNTIME_FIELDS[task]:
        with pytest.raises(RecipeError, match=r"runtime\.compile"):
            prepare(RECIPE[task], [*SIZES[task], "runtime.compile=true"])
    else:
        run = make_task(prepare(RECIPE[task], [*SIZES[task], "runtime.compile=true", f"runtime.output_dir={tmp_path}"]))
        assert isinstance(run.train_step.step_model, torch._dynamo.eval_frame.OptimizedModule)
        with pytest.raises(RecipeError, match=r"runtime\.compile_mode"):  # CUDA graphs cannot accumulate
            prepare(RECIPE[task], [*SIZES[task], "runtime.compile=true", "runtime.compile_mode=reduce-overhead",
                                   "optim.accum_steps=2"])
    if task in ("linprobe", "knn"):
        with pytest.raises(RecipeError, match=r"runtime\.strategy"):
            prepare(RECIPE[task], [*SIZES[task], "runtime.strategy=fsdp"])
        return
    run = make_task(prepare(RECIPE[task], [*SIZES[task], "runtime.strategy=fsdp", f"runtime.output_dir={tmp_path / 'f'}"]))
    try:
        assert run.sharded and run.run_dir.last.name == "last.dcp"
    finally:
        shutdown_world(run.world)
