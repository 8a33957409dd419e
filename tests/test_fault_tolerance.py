"""Never lose work: kill -9 and SIGTERM with exact resume, non-finite steps, checkpoint hygiene, bad files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from PIL import Image

from maeframe.build import prepare
from maeframe.engine.checkpoint import atomic_save, load_checkpoint
from maeframe.engine.loop import NonFiniteError
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError
from conftest import QUICKSTART, tiny


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args):
    return [sys.executable, "-m", "maeframe", "run", str(QUICKSTART), *args]


LONG = ["data.train.options.limit=320", "runtime.checkpoint_every_steps=2"]  # 2 epochs × 20 steps


def test_kill_9_then_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    subprocess.run(cli(*tiny(tmp_path / "straight", *LONG)), check=True, capture_output=True)
    expected = metrics(tmp_path / "straight" / "quickstart")
    run_dir = tmp_path / "killed" / "quickstart"
    process = subprocess.Popen(cli(*tiny(tmp_path / "killed", *LONG)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if len(lines) >= 7:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert 2 <= saved < 40 and saved % 2 == 0  # at most 2 steps of work lost
    subprocess.run(cli(*tiny(tmp_path / "killed", *LONG), "--resume"), check=True, capture_output=True)
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 41))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path):
    run_dir = tmp_path / "quickstart"
    process = subprocess.Popen(cli(*tiny(tmp_path, "data.train.options.limit=320")), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and
                                          len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err
    assert "stopped by signal SIGTERM" in err and "--resume" in err
    state = load_checkpoint(run_dir / "last.pt")
    assert state["step"] == len(metrics(run_dir))
    done = subprocess.run(cli(*tiny(tmp_path, "data.train.options.limit=320"), "--auto-resume"), capture_output=True)
    assert done.returncode == 0 and metrics(run_dir)[-1]["step"] == 40


def test_a_non_finite_step_is_skipped_and_counted(nan_recipe):
    trainer = Pretrainer(nan_recipe("runtime.nonfinite=skip", "runtime.max_steps=3"))
    trainer.train()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_step = trainer.optimizer.state[trainer.model.encoder.cls_token]["step"].item()
    trainer.train_step(3, [next(iter(trainer.loader))[:2]])  # the NaN step
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert trainer.optimizer.state[trainer.model.encoder.cls_token]["step"].item() == adam_step
    assert int(trainer.train_step.nonfinite) == 1 and int(trainer.train_step.first_nonfinite) == 3


def test_skip_policy_finishes_the_run(nan_recipe, tmp_path):
    Pretrainer(nan_recipe("runtime.nonfinite=skip")).train()
    lines = metrics(tmp_path / "out" / "quickstart")
    assert lines[3]["loss"] is None and lines[3]["nonfinite_steps"] == 1 and lines[-1]["step"] == 8
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "out" / "quickstart" / "last.pt")["model"].values())


def test_stop_policy_names_the_step_and_only_a_checkpoint_that_exists(nan_recipe, tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite loss or gradients at step 3") as stopped:
        Pretrainer(nan_recipe()).train()
    assert not (tmp_path / "out" / "quickstart" / "last.pt").exists()  # nothing after the bad step was saved
    assert "no checkpoint was written yet" in str(stopped.value) and "last.pt" not in str(stopped.value)
    # with a step checkpoint at step 2, the message names it and its step
    with pytest.raises(NonFiniteError, match=r"the last checkpoint is .*last.pt \(step 2\)"):
        Pretrainer(nan_recipe("runtime.checkpoint_every_steps=2", "name=again")).train()


def test_a_non_finite_model_is_never_checkpointed(tmp_path):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path)))
    with torch.no_grad():
        trainer.model.decoder.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write"):
        trainer.save(tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_keep_last_k_periodic_checkpoints(tmp_path):
    Pretrainer(prepare(QUICKSTART, tiny(tmp_path, "optim.epochs=4", "runtime.checkpoint_interval=1",
                                        "runtime.keep_checkpoints=2"))).train()
    names = sorted(p.name for p in (tmp_path / "quickstart").glob("checkpoint-*.pt"))
    assert names == ["checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt"]


def test_full_disk_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": "maeframe-checkpoint-1", "step": 1}, path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(MaeframeError, match="not enough disk space.*MiB free"):
        atomic_save({"format": "maeframe-checkpoint-1", "step": 2, "w": torch.zeros(10**6)}, path)
    assert load_checkpoint(path)["step"] == 1


def image_tree(root, good, bad):
    """good images 000.png..., and bad files named to sort between them (each followed by a good one)."""
    (root / "a").mkdir(parents=True)
    for i in range(good):
        Image.new("L", (28, 28), 40 + i).save(root / "a" / f"{i:03d}.png")
    kinds = [b"", b"not an image at all", None]
    for i in range(bad):
        content = kinds[i % 3]
        if content is None:  # a truncated PNG
            Image.new("L", (28, 28), 3).save(root / "a" / "full.png")
            content = (root / "a" / "full.png").read_bytes()[:40]
            (root / "a" / "full.png").unlink()
        (root / "a" / f"{i:03d}_bad.png").write_bytes(content)


def folder_recipe(tmp_path, root, *extra):
    return prepare(QUICKSTART, tiny(tmp_path / "out", "data.train.name=image_folder",
                                    f"data.train.options={{root: {root}, mean: [0.5], std: [0.5]}}", *extra))


def test_corrupt_files_are_skipped_counted_and_logged(tmp_path, caplog):
    image_tree(tmp_path / "data", good=61, bad=3)
    trainer = Pretrainer(folder_recipe(tmp_path, tmp_path / "data", "data.max_bad_fraction=0.1"))
    with caplog.at_level("WARNING", logger="maeframe.data"):
        trainer.train()
    lines = metrics(tmp_path / "out" / "quickstart")
    assert lines[-1]["step"] == 8 and lines[-1]["bad_samples"] == 6  # 3 bad files × 2 epochs
    assert "000_bad.png" in caplog.text and "002_bad.png" in caplog.text
    reports = [r for r in caplog.records if "002_bad.png" in r.getMessage()]
    assert len(reports) == 2  # once by the training loader, once by the pictures; counted every time


def test_too_many_corrupt_files_stop_the_run(tmp_path):
    image_tree(tmp_path / "data", good=40, bad=24)
    with pytest.raises(MaeframeError, match="sample reads failed.*data.max_bad_fraction=0.01"):
        Pretrainer(folder_recipe(tmp_path, tmp_path / "data")).train()


def truncated_png(path):
    Image.new("L", (28, 28), 3).save(path)
    path.write_bytes(path.read_bytes()[:40])


def test_a_whole_damaged_class_folder_is_skipped_and_counted(tmp_path, caplog):
    """An interrupted copy: one class folder of ten (10 % of the data) holds only truncated files. Folder
    datasets list files class by class, so the bad files form one run of 16 indices."""
    root = tmp_path / "data"
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(16):
            if c == 4:
                truncated_png(root / f"class{c}" / f"{i:03d}.png")
            else:
                Image.new("L", (28, 28), 10 * c + i).save(root / f"class{c}" / f"{i:03d}.png")
    trainer = Pretrainer(folder_recipe(tmp_path, root, "data.max_bad_fraction=0.2",
                                       "optim.epochs=1", "optim.warmup_epochs=0"))
    with caplog.at_level("WARNING", logger="maeframe.data"):
        trainer.train()
    lines = metrics(tmp_path / "out" / "quickstart")
    assert lines[-1]["step"] == 10 and 16 <= lines[-1]["bad_samples"] < 32  # every bad file, each read once or twice
    assert all(f"class4/{i:03d}.png" in caplog.text for i in range(16))


def test_one_bad_file_in_the_first_batch_does_not_stop_a_run_within_the_limit(tmp_path):
    """1 unreadable image of 150 (0.7 %, under data.max_bad_fraction=0.01), placed where the first batch reads
    it: the limit is judged over an epoch's reads until more have been made, as `maeframe pack` judges the
    folder, which accepts it too."""
    from maeframe.engine.data import sample_seed

    first = torch.randperm(150, generator=torch.Generator().manual_seed(sample_seed(0, 0, -1)))[0].item()
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(150):
        path = tmp_path / "data" / "a" / f"{i:03d}.png"
        truncated_png(path) if i == first else Image.new("L", (28, 28), i).save(path)
    trainer = Pretrainer(folder_recipe(tmp_path, tmp_path / "data", 
                                       "data.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0",
                                       "data.max_bad_fraction=0.01"))
    trainer.train()
    assert metrics(tmp_path / "out" / "quickstart")[0]["bad_samples"] == 1 and trainer.step == 4
    packed = subprocess.run([sys.executable, "-m", "maeframe", "pack", str(tmp_path / "data"), str(tmp_path / "packed"),
                             "--size", "28", "--channels", "1", "--max-bad-fraction", "0.01"], capture_output=True, text=True)
    assert packed.returncode == 0 and "1 unreadable skipped" in packed.stdout, packed.stderr
