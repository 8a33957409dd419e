"""Joint multimodal pretraining: OmniMAE's alternate mixing on real Fashion-MNIST images + moving clips, exact
resume and 2 processes, a joint checkpoint serving k-NN on both modalities, a third modality added by a test
plugin (alternate and paired, with a cross-modal loss), and the recipe errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.run import run_task
from maeframe.errors import MaeframeError
from conftest import RECIPES

OMNI = RECIPES / "omni_mae_fmnist.yaml"
# 32 images + 16 clips in batches of 8: 6 steps per epoch, 2 epochs; a ViT of width 24 and depth 1
TINY = ["modalities.image.data.train.options.limit=32", "modalities.video.data.train.options.limit=16",
        "modalities.image.data.eval.options.limit=2", "modalities.video.data.eval.options.limit=2",
        "data.batch_size=8", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
        "model.embed_dim=24", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=12",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "runtime.progress_bar=false",
        "runtime.tensorboard=false", "runtime.log_interval=1", "runtime.visualize_samples=2", "runtime.device=cpu"]


def tiny(output_dir, *extra):
    return [*TINY, f"runtime.output_dir={output_dir}", *extra]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint")
    run_task(prepare(OMNI, tiny(out)))
    return out / "omni_mae_fmnist"


def test_omnimae_trains_both_modalities_and_draws_both(joint_run):
    lines = metrics(joint_run)
    assert [m["step"] for m in lines] == list(range(1, 13))
    # every step trains one modality; each appears, and a step logs only its own terms
    drawn = [("loss/image/mse" in m, "loss/video/mse" in m) for m in lines]
    assert all(a != b for a, b in drawn) and any(a for a, _ in drawn) and any(b for _, b in drawn)
    for m in lines:
        term = m.get("loss/image/mse", m.get("loss/video/mse"))
        assert m["loss"] == pytest.approx(term)
    pictures = joint_run / "reconstructions"
    assert (pictures / "image" / "epoch0002.png").is_file()
    assert (pictures / "video" / "epoch0002.png").is_file() and (pictures / "video" / "epoch0002.gif").is_file()
    facts = json.loads((joint_run / "run.json").read_text())
    assert facts["mixing"] == "alternate" and facts["dataset_size"] == {"image": 32, "video": 16}
    keys = load_checkpoint(joint_run / "last.pt")["model"]
    assert "encoder.patch_embed.weight" in keys and "decoder.modalities.video.head.weight" in keys


def test_resume_continues_the_modality_draws_exactly(joint_run, tmp_path):
    run_task(prepare(OMNI, tiny(tmp_path, "runtime.max_steps=5")))  # stops inside the first epoch
    with pytest.raises(MaeframeError, match=r"modalities\.video\.weight: 1\.0 → 3\.0"):  # a modality change
        run_task(prepare(OMNI, tiny(tmp_path, "modalities.video.weight=3")), resume=True)
    run_task(prepare(OMNI, tiny(tmp_path)), resume=True)
    resumed, straight = metrics(tmp_path / "omni_mae_fmnist"), metrics(joint_run)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert resumed == [{**m, "time": r["time"], "img_s": r["img_s"], "data_wait": r["data_wait"]}
                       for m, r in zip(straight, resumed)]
    a, b = load_checkpoint(joint_run / "last.pt")["model"], load_checkpoint(tmp_path / "omni_mae_fmnist" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_continues_the_mixture_exactly(tmp_path):
    longer = ["modalities.image.data.train.options.limit=96", "modalities.video.data.train.options.limit=48",
              "runtime.checkpoint_every_steps=2"]  # 18 steps per epoch, 36 in all
    run_task(prepare(OMNI, tiny(tmp_path / "straight", *longer)))
    run_dir = tmp_path / "killed" / "omni_mae_fmnist"
    command = [sys.executable, "-m", "maeframe", "run", str(OMNI), *tiny(tmp_path / "killed", *longer)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        log = run_dir / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert 2 <= saved < 36 and saved % 2 == 0
    run_task(prepare(OMNI, tiny(tmp_path / "killed", *longer)), resume=True)
    straight = metrics(tmp_path / "straight" / "omni_mae_fmnist")
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 37))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (tmp_path / "straight" / "omni_mae_fmnist", run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(joint_run, tmp_path, strategy):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = tiny(tmp_path, "data.batch_size=4", f"runtime.strategy={strategy}")
    result = subprocess.run([*launcher, "-m", "maeframe", "run", str(OMNI), *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = metrics(joint_run), metrics(tmp_path / "omni_mae_fmnist")
    assert [m["step"] for m in double] == [m["step"] for m in single]
    for a, b in zip(single, double):
        assert sorted(k for k in a if k.startswith("loss")) == sorted(k for k in b if k.startswith("loss"))
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def knn(checkpoint, modality_recipe, out, *extra):
    limits = {"image": ["data.train.options.limit=60", "data.eval.options.limit=30"],
              "video": ["data.train.options.limit=30", "data.eval.options.limit=15", "data.batch_size=15"]}
    sizes = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2"]
    return run_task(prepare(RECIPES / f"knn_omni_fmnist_{modality_recipe}.yaml",
                            [f"init.checkpoint={checkpoint}", f"runtime.output_dir={out}", "runtime.device=cpu",
                             *sizes, *limits[modality_recipe], *extra]))


def test_one_joint_checkpoint_serves_knn_on_images_and_on_videos(joint_run, tmp_path):
    checkpoint = joint_run / "last.pt"
    image = knn(checkpoint, "image", tmp_path)                       # modality chosen by the tokenizer
    video = knn(checkpoint, "video", tmp_path)                       # init.modality: video
    for result in (image, video):
        assert 0 <= result["final"]["top1"] <= 100 and result["init"]["checkpoint"] == str(checkpoint)
    with pytest.raises(MaeframeError, match=r"init\.modality.*'audio' is not a modality"):
        knn(checkpoint, "image", tmp_path / "bad", "init.modality=audio")


TOY_ALTERNATE = """
name: toy
plugins: [joint_toy_plugin]
mixing: alternate
modalities:
  image:
    tokenizer: {name: image_patch, options: {image_size: 28, patch_size: 7, channels: 1}}
    masker: {name: random, options: {ratio: 0.75}}
    target: {name: pixel}
    losses: [{name: mse}]
    data: {train: {name: fashion_mnist, options: {limit: 16}}, eval: {name: fashion_mnist, options: {split: test, limit: 2}}}
    weight: 1.0
  signal:
    tokenizer: {name: toy_signal, options: {length: 32, patch: 4}}
    masker: {name: random, options: {ratio: 0.5}}
    target: {name: pixel}
    losses: [{name: mse}, {name: l1, weight: 0.5}]
    data: {train: {name: toy_waves}}
    weight: 2.0
model: {embed_dim: 16, depth: 2, num_heads: 2, decoder_embed_dim: 8, decoder_depth: 1, decoder_num_heads: 2}
data: {batch_size: 8, num_workers: 0}
optim: {epochs: 1, lr: 1.0e-3}
runtime: {device: cpu, progress_bar: false, tensorboard: false, log_interval: 1, visualize_samples: 2}
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES.parent / "tests"))
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_ALTERNATE)
    return path


def test_a_third_modality_from_a_test_plugin_mixes_with_images(toy, tmp_path):
    monitor = "monitor={bank: 16, queries: 8, k: 5}"  # a k-NN monitor per modality, on its own data
    run_task(prepare(toy, [f"runtime.output_dir={tmp_path}", monitor]))
    lines = metrics(tmp_path / "toy")
    knn = lines.pop()  # the monitor's line at the end of the epoch
    assert knn["step"] == 8 and {"monitor/image/knn_top1", "monitor/signal/knn_top1"} <= set(knn)
    assert knn["monitor/signal/queries"] == 8 and knn["monitor/image/queries"] == 2  # image: its data.eval
    assert len(lines) == 8  # (16 images + 48 signals) / 8 per step
    signal = [m for m in lines if "loss/signal/mse" in m]
    assert signal and all(m["loss"] == pytest.approx(m["loss/signal/mse"] + 0.5 * m["loss/signal/l1"])
                          for m in signal)
    assert any("loss/image/mse" in m for m in lines)
    assert (tmp_path / "toy" / "reconstructions" / "image" / "epoch0001.png").is_file()


PAIRED = ["mixing=paired", "modalities.image.data=null", "modalities.signal.data=null", "modalities.signal.weight=1",
          "data.train={name: toy_stripes_and_waves, options: {count: 16}}",
          "joint_losses=[{name: toy_pooled_agreement, weight: 0.1}]", "model.modality_blocks=1",
          "model.pooled_latent=separate"]


def test_paired_modalities_meet_in_the_joint_blocks_with_a_cross_modal_loss(toy, tmp_path):
    paired = [*PAIRED, f"runtime.output_dir={tmp_path}"]
    with pytest.raises(MaeframeError, match="monitor: the online k-NN monitor follows each modality's own data"):
        prepare(toy, [*paired, "monitor={}"])
    run_task(prepare(toy, paired))
    lines = metrics(tmp_path / "toy")
    assert len(lines) == 2
    for m in lines:
        parts = m["loss/image/mse"] + m["loss/signal/mse"] + 0.5 * m["loss/signal/l1"] + 0.1 * m["loss/joint/toy_pooled_agreement"]
        assert m["loss"] == pytest.approx(parts)
    keys = load_checkpoint(tmp_path / "toy" / "last.pt")["model"]
    assert "encoder.modalities.signal.blocks.0.attn.qkv.weight" in keys and "encoder.modalities.image.type_embed" in keys
    assert (tmp_path / "toy" / "reconstructions" / "image" / "epoch0001.png").is_file()


@pytest.mark.parametrize("override, field, words", [
    ("tokenizer={name: image_patch}", "tokenizer", "gives each modality its own tokenizer"),
    ("joint_losses=[{name: toy_pooled_agreement}]", "joint_losses", "need mixing: paired"),
    ("mixing=null", "mixing", "required with modalities"),
    ("modalities.signal.data.train.name=toy_stripes_and_waves", "modalities.signal.data.train.name",
     "several modalities per sample"),
    ("modalities.signal.losses.0.name=toy_pooled_agreement", "modalities.signal.losses.0.name", "cross-modal loss"),
])
def test_recipe_errors_name_the_field(toy, capsys, override, field, words):
    assert main(["validate", str(toy), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"  {field}: " in err and words in err, err


def test_single_modality_recipes_refuse_joint_fields():
    with pytest.raises(MaeframeError, match="joint_losses: only a joint recipe"):
        prepare(RECIPES / "quickstart.yaml", ["joint_losses=[{name: mse}]"])
    with pytest.raises(MaeframeError, match="model.modality_blocks: only a joint recipe"):
        prepare(RECIPES / "quickstart.yaml", ["model.modality_blocks=1"])


def test_paired_two_processes_follow_one(toy, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent / "tests")}
    result = subprocess.run([*launcher, "-m", "maeframe", "run", str(toy), *PAIRED, "data.batch_size=4",
                             f"runtime.output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_task(prepare(toy, [*PAIRED, f"runtime.output_dir={tmp_path / 'one'}"]))
    one, two = metrics(tmp_path / "one" / "toy"), metrics(tmp_path / "two" / "toy")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "loss/joint/toy_pooled_agreement", "loss/signal/l1"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])


def test_a_modality_view_of_the_joint_encoder_is_a_single_modality_encoder():
    from maeframe import TokenSpec
    from maeframe.model.joint import JointMaskedAutoencoder, ModalityEncoder
    from maeframe.model.joint_weights import modality_encoder_state
    from maeframe.model.vit import Encoder
    from maeframe.recipe import ModelConfig

    torch.manual_seed(0)
    specs = {"a": TokenSpec((4, 4), (4, 4), 1), "b": TokenSpec((2, 4, 4), (2, 4, 4), 1)}
    config = ModelConfig(embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=2)
    joint = JointMaskedAutoencoder(specs, {"a": 16, "b": 32}, config, typed=True).eval()
    single = Encoder(specs["b"].grid, 32, 24, 2, 2).eval()
    state = modality_encoder_state(joint.state_dict(), "b", modality_blocks=0)
    single.load_state_dict({k[len("encoder."):]: v for k, v in state.items()})  # strict: every name, no extra
    patches = torch.randn(3, 32, 32)
    keep = torch.rand(3, 32).argsort(1)[:, :5]
    view = ModalityEncoder(joint.encoder, "b")
    assert torch.allclose(single(patches, keep), view(patches, keep), atol=1e-5)  # type embedding folded in the bias
    assert torch.allclose(single(patches), view(patches), atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_one_joint_checkpoint_fine_tunes_on_each_modality(joint_run, tmp_path, modality):
    """The k-NN recipes' tokenizer and data as a 2-step fine-tuning run from the joint checkpoint: the encoder
    view of that modality loads (every parameter covered) and trains."""
    import yaml

    from maeframe.recipe import parse_recipe

    tree = yaml.safe_load((RECIPES / f"knn_omni_fmnist_{modality}.yaml").read_text())
    del tree["knn"]
    tree.update(task="finetune", name=f"ft_{modality}", optim={"epochs": 1, "warmup_epochs": 0},
                model={"embed_dim": 24, "depth": 1, "num_heads": 2}, head={"pool": "avg"},
                augment={"mixup": 0, "cutmix": 0, "rand_augment": None, "random_erasing": 0})
    tree["init"]["checkpoint"] = str(joint_run / "last.pt")
    tree["data"].update(batch_size=8, num_workers=0)
    tree["data"]["train"]["options"]["limit"] = 16
    tree["data"]["eval"]["options"]["limit"] = 8
    tree["runtime"].update(output_dir=str(tmp_path), device="cpu", max_steps=2)
    result = run_task(prepare(parse_recipe(tree)))
    assert result["init"]["checkpoint"] == str(joint_run / "last.pt") and 0 <= result["final"]["top1"] <= 100
