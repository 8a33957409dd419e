"""The online k-NN monitor of pretraining (recipe block `monitor`) on real Fashion-MNIST, tiny sizes: it
agrees with the `knn` task, leaves the training trajectory bit for bit unchanged, survives --resume,
appears at the configured epochs only, and bad settings are errors naming their field."""
import json

import pytest
import torch

from maeframe.build import prepare
from maeframe.engine.run import run_task
from maeframe.engine.monitor import KnnMonitor
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError, RecipeError
from conftest import QUICKSTART, RECIPES, tiny

EVAL = ["data.eval={name: fashion_mnist, options: {split: test, limit: 32}}"]
MONITOR = ["monitor.knn_every_epochs=1", "monitor.k=20", "monitor.temperature=0.07", "monitor.pool=avg"]


def pretrain(out, *extra, resume=False) -> Pretrainer:
    trainer = Pretrainer(prepare(QUICKSTART, tiny(out, *extra)), resume=resume)
    trainer.train()
    return trainer


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "quickstart" / "metrics.jsonl").read_text().splitlines()]


def monitor_lines(out) -> list[dict]:
    return [line for line in lines(out) if "monitor/knn_top1" in line]


def test_monitor_equals_the_knn_task_on_the_same_encoder_and_images(tmp_path, capsys):
    out = tmp_path / "pretrain"
    pretrain(out, *EVAL, *MONITOR, "monitor.bank=null", "monitor.queries=null", "runtime.tensorboard=true")
    final = monitor_lines(out)[-1]
    assert final["step"] == 8 and final["epoch"] == 2
    assert final["monitor/bank"] == 64 and final["monitor/queries"] == 32
    knn = run_task(prepare(RECIPES / "knn_fmnist.yaml", [
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.train.options.limit=64",
        "data.eval.options.limit=32", "data.batch_size=16", "data.num_workers=0", "knn.pool=avg",
        f"init.checkpoint={out / 'quickstart' / 'last.pt'}", f"runtime.output_dir={tmp_path / 'knn'}"]))
    assert final["monitor/knn_top1"] == knn["final"]["top1"]
    assert final["monitor/knn_top5"] == knn["final"]["top5"]
    assert f"epoch 2: k-NN monitor top-1 {final['monitor/knn_top1']:.2f}%" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "quickstart" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("monitor/knn_top1")] == [4, 8]
    assert events.Scalars("monitor/knn_top1")[-1].value == pytest.approx(final["monitor/knn_top1"])


def test_the_trajectory_is_bit_for_bit_the_same_with_the_monitor_on(tmp_path):
    off = pretrain(tmp_path / "off", *EVAL)
    on = pretrain(tmp_path / "on", *EVAL, *MONITOR, "monitor.bank=40", "monitor.queries=20")
    assert len(monitor_lines(tmp_path / "on")) == 2 and not monitor_lines(tmp_path / "off")
    training = lambda out: [(line["step"], line["loss"]) for line in lines(out) if "loss" in line]  # noqa: E731
    assert training(tmp_path / "on") == training(tmp_path / "off") and len(training(tmp_path / "off")) == 8
    for name, weight in off.model.state_dict().items():
        assert torch.equal(weight, on.model.state_dict()[name]), name
    first, second = (torch.load(out / "quickstart" / "last.pt", weights_only=False)["rng"]["torch"]
                     for out in (tmp_path / "off", tmp_path / "on"))
    assert torch.equal(first, second)


def test_epochs_and_resume(tmp_path):
    """Every 2 epochs and the last (3 epochs: after 2 and 3); a run stopped mid-way and resumed logs the
    same monitor lines and losses as one that never stopped."""
    schedule = ["optim.epochs=3", "monitor.knn_every_epochs=2", "monitor.bank=40", "monitor.queries=20"]
    pretrain(tmp_path / "whole", *schedule)
    whole = monitor_lines(tmp_path / "whole")
    assert [(line["step"], line["epoch"]) for line in whole] == [(8, 2), (12, 3)]
    assert whole[0]["monitor/queries"] == 20 and whole[0]["monitor/bank"] == 40  # no data.eval: other train images
    pretrain(tmp_path / "split", *schedule, "runtime.max_steps=10")
    assert len(monitor_lines(tmp_path / "split")) == 1
    pretrain(tmp_path / "split", *schedule, "runtime.max_steps=null", resume=True)
    drop_time = lambda rows: [{k: v for k, v in row.items() if k not in ("time", "monitor/seconds", "img_s",  # noqa: E731
                                                                            "data_wait", "step_s")} for row in rows]
    assert drop_time(monitor_lines(tmp_path / "split")) == drop_time(whole)
    assert [line.get("loss") for line in lines(tmp_path / "split")] == [line.get("loss") for line in lines(tmp_path / "whole")]


def test_subsets_are_seeded_and_disjoint_without_an_eval_set(tmp_path):
    prepared = prepare(QUICKSTART, tiny(tmp_path, "monitor.bank=40", "monitor.queries=16"))
    first, again = (KnnMonitor(prepared, prepared.recipe.monitor, torch.device("cpu")) for _ in range(2))
    assert first.bank.indices == again.bank.indices and first.queries.indices == again.queries.indices
    assert len(first.bank) == 40 and len(first.queries) == 16 and not set(first.bank.indices) & set(first.queries.indices)
    other = prepare(QUICKSTART, tiny(tmp_path, "monitor.bank=40", "seed=1"))
    assert KnnMonitor(other, other.recipe.monitor, torch.device("cpu")).bank.indices != first.bank.indices


@pytest.mark.parametrize("setting, field", [
    ("monitor.knn_every_epochs=0", "monitor.knn_every_epochs"), ("monitor.bank=0", "monitor.bank"),
    ("monitor.pool=max", "monitor.pool"), ("monitor.temperature=-1", "monitor.temperature"),
    ("monitor.every=2", "monitor.every"), ("monitor.k=50", "monitor.k"),
])
def test_bad_settings_name_their_field(tmp_path, setting, field):
    with pytest.raises(RecipeError) as caught:
        prepare(QUICKSTART, tiny(tmp_path, "monitor.bank=40", setting))
    assert field in [path for path, _ in caught.value.problems]


UNLABELLED_PLUGIN = """
from maeframe import hookimpl
from maeframe_plugins.image_data import FashionMNISTDataset

class UnlabelledFashionMNIST(FashionMNISTDataset):
    '''Fashion-MNIST images with the labels thrown away (-1), like an unlabelled image list.'''
    def __getitem__(self, index):
        return super().__getitem__(index)[0], -1

@hookimpl
def register_datasets(register):
    register("unlabelled_fmnist", UnlabelledFashionMNIST)
"""


def test_unlabelled_data_or_too_few_images_is_a_clear_error_before_the_run_starts(tmp_path, monkeypatch):
    (tmp_path / "unlabelled_plugin.py").write_text(UNLABELLED_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    with pytest.raises(MaeframeError, match=r"monitor: data\.train \(UnlabelledFashionMNIST\) yields no class labels"):
        Pretrainer(prepare(QUICKSTART, tiny(out, "plugins=[unlabelled_plugin]", "data.train.name=unlabelled_fmnist",
                                            "monitor.bank=40")))
    with pytest.raises(MaeframeError, match=r"monitor: data\.train has 20 images, too few for a bank of k=20"):
        Pretrainer(prepare(QUICKSTART, tiny(out, "data.train.options.limit=20", "monitor.bank=100")))
    assert not (out / "quickstart").exists()
    small = Pretrainer(prepare(QUICKSTART, tiny(tmp_path / "small", "monitor.bank=100"))).monitor  # 64 images,
    assert (len(small.bank), len(small.queries)) == (52, 12)  # no data.eval: a fifth stays for the queries
