"""Fine-tuning, linear probing and k-NN under torchrun (2 CPU processes, gloo) follow one process with the
same global batch: mixup/cutmix partners and draws, RandAugment, erasing, drop path and the probe's BatchNorm
are functions of the global batch, not of the rank; evaluation is sharded and gathered (each sample once)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from maeframe.build import prepare
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.pretrain import Pretrainer
from conftest import QUICKSTART, RECIPES, tiny
from test_downstream_av import (AUDIO_ENCODER, VIDEO_ENCODER, audio_checkpoint, video_checkpoint,  # noqa: F401
                                write_multi_label_csv)

ENCODER = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
RUNTIME = ["runtime.progress_bar=false", "runtime.tensorboard=false", "data.num_workers=0"]
TRAIN = ["optim.epochs=2", "optim.warmup_epochs=1", "runtime.log_interval=1"]
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    Pretrainer(prepare(QUICKSTART, tiny(out, *ENCODER))).train()
    return out / "quickstart" / "last.pt"


def command(processes: int, recipe, *overrides, global_batch: int = GLOBAL_BATCH) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    batch = f"data.batch_size={global_batch // processes}"
    return [*launcher, "-m", "maeframe", "run", str(recipe), *RUNTIME, batch, *overrides]


def run(processes: int, recipe, *overrides, global_batch: int = GLOBAL_BATCH) -> None:
    done = subprocess.run(command(processes, recipe, *overrides, global_batch=global_batch), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def read(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line], json.loads((run_dir / "results.json").read_text())


def assert_same_run(expected, got):
    (train_a, results_a), (train_b, results_b) = expected, got
    assert [m["step"] for m in train_b] == [m["step"] for m in train_a]
    for a, b in zip(train_a, train_b):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    final = [k for k in ("top1", "top5", "mAP") if k in results_a["final"]]
    assert {k: results_b["final"][k] for k in final} == {k: results_a["final"][k] for k in final}
    assert results_b["dataset"] == results_a["dataset"]
    for a, b in zip(results_a["history"], results_b["history"]):
        assert a["epoch"] == b["epoch"] and all(a[k] == b[k] for k in final), (a, b)
    assert results_b.get("best", {}) and results_b["best"]["epoch"] == results_a["best"]["epoch"]


def finetune_overrides(out, checkpoint, *extra):
    return [*ENCODER, *TRAIN, "data.train.options.limit=64", "data.eval.options.limit=30", "model.drop_path=0.2",
            f"runtime.output_dir={out}", f"init.checkpoint={checkpoint}", *extra]


@pytest.fixture(scope="module")
def finetune_single(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp("finetune-one")
    run(1, RECIPES / "finetune_fmnist.yaml", *finetune_overrides(out, pretrained))
    return read(out / "finetune_fmnist")


def test_finetune_on_two_processes_follows_one_process(tmp_path, pretrained, finetune_single):
    """The recipe's full regularisation: mixup/cutmix, RandAugment, random erasing, label smoothing, drop path;
    30 eval images shard unevenly (15 + 15) and are each counted once."""
    run(2, RECIPES / "finetune_fmnist.yaml", *finetune_overrides(tmp_path, pretrained))
    assert_same_run(finetune_single, read(tmp_path / "finetune_fmnist"))
    facts = json.loads((tmp_path / "finetune_fmnist" / "run.json").read_text())
    assert facts["world_size"] == 2 and facts["effective_batch"] == GLOBAL_BATCH
    assert finetune_single[1]["dataset"]["eval"] == 30
    assert sum(finetune_single[1]["final"]["confusion_matrix"], []).count(0) < 100  # a real matrix: 30 counted
    assert sum(map(sum, read(tmp_path / "finetune_fmnist")[1]["final"]["confusion_matrix"])) == 30


def test_finetune_checkpoints_move_between_world_sizes_and_fsdp(tmp_path, pretrained, finetune_single):
    """2 processes stop at step 3, one process resumes; fsdp on 2 processes (sharded DCP checkpoints, best
    kept) follows the same trajectory and resumes in one ddp process."""
    recipe = RECIPES / "finetune_fmnist.yaml"
    run(2, recipe, *finetune_overrides(tmp_path / "a", pretrained, "runtime.max_steps=3"))
    run(1, recipe, *finetune_overrides(tmp_path / "a", pretrained), "--resume")
    assert_same_run(finetune_single, read(tmp_path / "a" / "finetune_fmnist"))
    run(2, recipe, *finetune_overrides(tmp_path / "b", pretrained, "runtime.strategy=fsdp", "runtime.max_steps=5"))
    run_dir = tmp_path / "b" / "finetune_fmnist"
    assert (run_dir / "last.dcp" / ".metadata").is_file() and (run_dir / "best.dcp" / ".metadata").is_file()
    assert load_checkpoint(run_dir / "last.dcp")["step"] == 5
    run(1, recipe, *finetune_overrides(tmp_path / "b", pretrained), "--resume")
    assert_same_run(finetune_single, read(run_dir))


def test_linear_probe_on_two_processes_follows_one_process(tmp_path, pretrained):
    """The BatchNorm head normalises with the global batch's statistics on every process."""
    overrides = [*ENCODER, *TRAIN, "data.train.options.limit=64", "data.eval.options.limit=30",
                 f"init.checkpoint={pretrained}"]
    run(1, RECIPES / "linprobe_fmnist.yaml", *overrides, f"runtime.output_dir={tmp_path / 'one'}")
    run(2, RECIPES / "linprobe_fmnist.yaml", *overrides, f"runtime.output_dir={tmp_path / 'two'}")
    one, two = (read(tmp_path / n / "linprobe_fmnist") for n in ("one", "two"))
    assert_same_run(one, two)
    state = [load_checkpoint(tmp_path / n / "linprobe_fmnist" / "last.pt")["model"] for n in ("one", "two")]
    for key in ("head.0.running_mean", "head.0.running_var"):
        assert (state[0][key] - state[1][key]).abs().max() < 1e-5, key


def test_knn_on_two_processes_equals_one(tmp_path, pretrained):
    overrides = [*ENCODER, "data.train.options.limit=101", "data.eval.options.limit=33", f"init.checkpoint={pretrained}"]
    run(1, RECIPES / "knn_fmnist.yaml", *overrides, f"runtime.output_dir={tmp_path / 'one'}")
    run(2, RECIPES / "knn_fmnist.yaml", *overrides, f"runtime.output_dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / n / "knn_fmnist" / "results.json").read_text()) for n in ("one", "two"))
    assert one["dataset"] == two["dataset"] == {"train": 101, "eval": 33, "num_classes": 10}
    assert one["final"]["confusion_matrix"] == two["final"]["confusion_matrix"]
    assert one["final"]["top1"] == two["final"]["top1"] and two["world_size"] == 2


def test_video_and_audio_fine_tuning_on_two_processes_follow_one(tmp_path, video_checkpoint, audio_checkpoint):
    """Multi-view video testing (clips × crops per sample) and multi-label mAP, sharded and gathered."""
    video = [*VIDEO_ENCODER, *TRAIN, "data.train.options.limit=32", "data.eval.options.limit=5",
             "augment.mixup=0.8", "augment.cutmix=1.0", "model.drop_path=0.1", f"init.checkpoint={video_checkpoint}"]
    classes = write_multi_label_csv(tmp_path / "letters.csv")
    dataset = ("{name: audio_csv, options: {csv: %s, multi_label: true, classes: %s, where: {split: [%s]}, "
               "mean: -7.92, std: 5.519}}")
    audio = [*AUDIO_ENCODER, *TRAIN, "head.multi_label=true", "augment.label_smoothing=0.1", "augment.mixup=0.5",
             f"data.train={dataset % (tmp_path / 'letters.csv', classes, 'train')}",
             f"data.eval={dataset % (tmp_path / 'letters.csv', classes, 'test')}", f"init.checkpoint={audio_checkpoint}"]
    for recipe, overrides, batch in ((RECIPES / "finetune_video_moving_fmnist.yaml", video, GLOBAL_BATCH),
                                     (RECIPES / "finetune_audio_klettres.yaml", audio, 4)):
        for processes in (1, 2):
            run(processes, recipe, *overrides, f"runtime.output_dir={tmp_path / str(processes)}", global_batch=batch)
        assert_same_run(*(read(tmp_path / str(n) / recipe.stem) for n in (1, 2)))


@pytest.mark.parametrize("processes", [1, 2])
def test_finetune_killed_with_sigkill_resumes_bit_for_bit(tmp_path, pretrained, processes):
    """kill -9 of the whole job (every process) after a step checkpoint; the resumed run's losses equal an
    uninterrupted run's exactly."""
    recipe = RECIPES / "finetune_fmnist.yaml"
    overrides = finetune_overrides(tmp_path / "straight", pretrained, "data.train.options.limit=160",
                                   "runtime.checkpoint_every_steps=2")
    run(processes, recipe, *overrides)
    expected, _ = read(tmp_path / "straight" / "finetune_fmnist")
    overrides = [o.replace("straight", "killed") for o in overrides]
    run_dir = tmp_path / "killed" / "finetune_fmnist"
    job = subprocess.Popen(command(processes, recipe, *overrides), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        log = run_dir / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert 2 <= saved < 20 and saved % 2 == 0
    run(processes, recipe, *overrides, "--resume")
    resumed, _ = read(run_dir)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected] == list(range(1, 21))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]
