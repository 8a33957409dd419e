import json

import pytest
import torch
from PIL import Image

from maeframe.build import prepare
from maeframe.engine.checkpoint import atomic_save, load_checkpoint
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError
from conftest import QUICKSTART, tiny


def train(tmp_path, *extra, resume=False):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *extra)), resume=resume)
    trainer.train()
    return trainer


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_everything(tmp_path):
    trainer = train(tmp_path, "runtime.tensorboard=true", "runtime.checkpoint_interval=1")
    run = tmp_path / "quickstart"
    assert trainer.step == 8  # 64 images / 16 per batch × 2 epochs
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert {"loss", "loss/mse", "lr", "img_s", "epoch", "data_wait"} <= set(lines[0])
    assert (run / "recipe.yaml").read_text().startswith("task: pretrain")
    facts = json.loads((run / "run.json").read_text())
    assert facts["effective_batch"] == 16 and facts["steps_per_epoch"] == 4
    assert facts["plugins"]["masker"]["plugin"] == "masking"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ["last.pt", "checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt"]:
        assert load_checkpoint(run / name)["format"] == "maeframe-checkpoint-1"
    picture = Image.open(run / "reconstructions" / "epoch0002.png")
    assert picture.size[0] > 4 * 112 and picture.size[1] > 8 * 112  # 4 columns × 8 rows, enlarged
    assert not list(run.glob(".*.tmp"))


def test_resume_is_exact(tmp_path):
    straight = train(tmp_path / "a")
    train(tmp_path / "b", "runtime.max_steps=3")  # stops mid-epoch, writes last.pt
    resumed = train(tmp_path / "b", resume=True)
    assert losses(tmp_path / "b" / "quickstart") == losses(tmp_path / "a" / "quickstart")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_is_exact_with_loader_workers_and_accumulation(tmp_path):
    extra = ["data.num_workers=2", "optim.accum_steps=2", "data.batch_size=8"]
    train(tmp_path / "a", *extra)
    train(tmp_path / "b", *extra, "runtime.max_steps=5")
    train(tmp_path / "b", *extra, resume=True)
    assert losses(tmp_path / "b" / "quickstart") == losses(tmp_path / "a" / "quickstart")


def test_existing_run_is_never_overwritten(tmp_path):
    train(tmp_path, "runtime.max_steps=1")
    with pytest.raises(MaeframeError, match="already holds a run"):
        Pretrainer(prepare(QUICKSTART, tiny(tmp_path)))
    with pytest.raises(MaeframeError, match="there is no run at .*other to resume"):
        Pretrainer(prepare(QUICKSTART, tiny(tmp_path, "name=other")), resume=True)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": "maeframe-checkpoint-1", "step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_save({"format": "maeframe-checkpoint-1", "step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_loss_decreases_on_real_data(tmp_path):
    train(tmp_path, "data.train.options.limit=256", "optim.epochs=3", "optim.lr=3e-3", "runtime.log_interval=16")
    values = losses(tmp_path / "quickstart")
    assert values[-1] < 0.8 * values[0], values


def test_repeated_loss_names_are_logged_apart(tmp_path):
    train(tmp_path, "runtime.max_steps=2", "losses=[{name: mse}, {name: mse, weight: 0.5}]")
    line = json.loads((tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["loss/mse.0"] == line["loss/mse.1"]
    assert abs(line["loss"] - 1.5 * line["loss/mse.0"]) < 1e-5


def test_pictures_of_a_single_sample_do_not_need_batch_losses(tmp_path):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, "runtime.visualize_samples=1",
                                                  "losses=[{name: mse}, {name: uniformity, weight: 0.01}]")))
    assert trainer.visualize(tmp_path / "one.png")
