"""The hog, feature and frequency targets: each checked against an independent computation written here.

HOG is compared with a pixel-by-pixel Python loop reference; the teacher targets with hooks on a manual
forward of the same network and with short end-to-end training runs on real Fashion-MNIST (the timm
teacher is a tiny randomly initialised ViT written to tmp_path: nothing is downloaded); the frequency
targets with properties of the orthonormal DFT (DC of a constant, Parseval, exact inverse, complementary
bands).
"""
from __future__ import annotations

import io
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_file

from maeframe import Mask, RecipeError, Tokens
from maeframe.build import prepare
from maeframe.engine.pretrain import Pretrainer
from maeframe.model import MaskedAutoencoder
from maeframe.plugins import make_plugin_manager
from maeframe.recipe import ModelConfig
from maeframe.registry import Registry
from maeframe_plugins.feature_target import FeatureOptions, FeatureTarget
from maeframe_plugins.frequency import FrequencyOptions, FrequencyTarget
from maeframe_plugins.hog import HOGOptions, HOGTarget
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.video import VideoTubeOptions, VideoTubeTokenizer
from conftest import QUICKSTART, tiny


def image_tokenizer(size, patch, channels) -> ImagePatchTokenizer:
    return ImagePatchTokenizer(ImagePatchOptions(image_size=size, patch_size=patch, channels=channels))


def tube_tokenizer(frames: int, size: int, tubelet: int, patch: int, channels: int) -> VideoTubeTokenizer:
    return VideoTubeTokenizer(VideoTubeOptions(num_frames=frames, image_size=size, tubelet=tubelet,
                                               patch_size=patch, channels=channels))


# --- HOG -------------------------------------------------------------------------------------------------

def reference_cells(frame: torch.Tensor, bins: int, cell: int, soft: bool):
    """frame [C, H, W] -> hist[c][cell row][cell col][bin], one pixel at a time in float64 Python."""
    img = frame.double().tolist()
    channels, height, width = frame.shape

    def pixel(c, r, k):  # reflect at the border: index -1 reads 1, index H reads H-2
        r = -r if r < 0 else 2 * (height - 1) - r if r >= height else r
        k = -k if k < 0 else 2 * (width - 1) - k if k >= width else k
        return img[c][r][k]

    hist = [[[[0.0] * bins for _ in range(width // cell)] for _ in range(height // cell)] for _ in range(channels)]
    for c in range(channels):
        for r in range(height):
            for k in range(width):
                gx = pixel(c, r, k + 1) - pixel(c, r, k - 1)
                gy = pixel(c, r + 1, k) - pixel(c, r - 1, k)
                magnitude = math.sqrt(gx * gx + gy * gy)
                angle = math.atan2(gy, gx) % math.pi
                position = angle / (math.pi / bins)
                votes = hist[c][r // cell][k // cell]
                if soft:
                    below = math.floor(position - 0.5)
                    weight = position - 0.5 - below
                    votes[below % bins] += magnitude * (1 - weight)
                    votes[(below + 1) % bins] += magnitude * weight
                else:
                    votes[int(position) % bins] += magnitude
    return hist


def normalised(vector, eps):
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / (norm + eps) for v in vector]


def reference_hog(video: torch.Tensor, patch: int, tubelet: int, bins: int, cell: int, soft: bool, norm: str,
                  eps: float = 1e-6) -> torch.Tensor:
    """video [C, T, H, W] -> [N, T·C·(p/cell)²·bins]: per token, the tubelet's frames, then channels, cell
    rows, cell columns, bins; L2-normalised per token or per cell."""
    channels, frames, height, width = video.shape
    per_frame = [reference_cells(video[:, f], bins, cell, soft) for f in range(frames)]
    if norm == "cell":
        per_frame = [[[[normalised(h, eps) for h in row] for row in ch] for ch in hist] for hist in per_frame]
    cells = patch // cell
    tokens = []
    for tt in range(frames // tubelet):
        for ty in range(height // patch):
            for tx in range(width // patch):
                vector = [per_frame[tt * tubelet + f][c][ty * cells + i][tx * cells + j][k]
                          for f in range(tubelet) for c in range(channels)
                          for i in range(cells) for j in range(cells) for k in range(bins)]
                tokens.append(normalised(vector, eps) if norm == "token" else vector)
    return torch.tensor(tokens)


@pytest.mark.parametrize("soft,norm,bins", [(False, "token", 9), (True, "token", 9), (False, "cell", 6),
                                            (True, "cell", 4)])
def test_hog_equals_the_loop_reference_on_images(soft, norm, bins):
    torch.manual_seed(0)
    tokenizer = image_tokenizer(8, 4, 2)
    images = torch.rand(2, 2, 8, 8) * 3 - 1
    target = HOGTarget(HOGOptions(bins=bins, cell=2, soft_bins=soft, norm=norm), tokenizer)
    values = target(tokenizer.tokenize(images), None).values
    assert values.shape == (2, 4, target.out_dim) and target.out_dim == 2 * 2 * 2 * bins
    assert values.dtype == torch.float32
    for i in range(2):
        expected = reference_hog(images[i].unsqueeze(1), patch=4, tubelet=1, bins=bins, cell=2, soft=soft, norm=norm)
        torch.testing.assert_close(values[i], expected.float(), atol=1e-5, rtol=0)


def test_hog_equals_the_loop_reference_on_video_tubes():
    torch.manual_seed(1)
    tokenizer = tube_tokenizer(frames=4, size=8, tubelet=2, patch=4, channels=1)
    video = torch.rand(2, 1, 4, 8, 8)
    target = HOGTarget(HOGOptions(bins=9, cell=2), tokenizer)
    values = target(tokenizer.tokenize(video), None).values
    assert target.out_dim == 2 * 1 * 2 * 2 * 9 and values.shape == (2, 8, 72)
    for i in range(2):
        expected = reference_hog(video[i], patch=4, tubelet=2, bins=9, cell=2, soft=False, norm="token")
        torch.testing.assert_close(values[i], expected.float(), atol=1e-5, rtol=0)


def test_hog_out_dim_with_default_options_and_patch_that_is_not_a_multiple_of_the_cell():
    assert HOGTarget(HOGOptions(), image_tokenizer(224, 16, 3)).out_dim == 3 * 2 * 2 * 9
    assert HOGTarget(HOGOptions(cell=4), image_tokenizer(28, 4, 1)).out_dim == 9
    with pytest.raises(ValueError, match="not a multiple of the HOG cell 8"):
        HOGTarget(HOGOptions(), image_tokenizer(28, 4, 1))
    with pytest.raises(ValueError, match="multiple of the HOG cell 3"):
        HOGTarget(HOGOptions(cell=3), image_tokenizer(32, 8, 1))


def test_hog_is_invariant_to_brightness_shift_and_contrast_scale():
    torch.manual_seed(2)
    tokenizer = image_tokenizer(16, 8, 3)
    images = torch.rand(3, 3, 16, 16)
    target = HOGTarget(HOGOptions(cell=4, soft_bins=True), tokenizer)
    values = target(tokenizer.tokenize(images), None).values
    shifted = target(tokenizer.tokenize(images + 0.75), None).values
    scaled = target(tokenizer.tokenize(images * 2.5), None).values
    torch.testing.assert_close(shifted, values, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled, values, atol=1e-5, rtol=0)
    assert torch.allclose(values.norm(dim=-1), torch.ones(3, 4), atol=1e-4)
    flat = target(tokenizer.tokenize(torch.full((1, 3, 16, 16), 0.3)), None).values
    assert torch.equal(flat, torch.zeros_like(flat))  # no gradient anywhere: all-zero, not NaN


def test_hog_runs_in_fp32_under_autocast():
    tokenizer = image_tokenizer(16, 8, 1)
    tokens = tokenizer.tokenize(torch.rand(2, 1, 16, 16))
    target = HOGTarget(HOGOptions(cell=4), tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = target(tokens, None).values
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, target(tokens, None).values)


def test_hog_rejects_a_source_of_the_wrong_shape():
    target = HOGTarget(HOGOptions(cell=4), image_tokenizer(16, 8, 1))
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        target(Tokens(torch.zeros(1, 4, 64), torch.zeros(1, 1, 16, 8)), None)


# --- feature: timm teacher -------------------------------------------------------------------------------

TEACHER_KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "depth": 2}


def make_teacher(**overrides):
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TEACHER_KWARGS, **overrides})


@pytest.fixture
def teacher_file(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file(make_teacher().state_dict(), str(path))
    return path


def timm_options(weights, **extra) -> FeatureOptions:
    return FeatureOptions(teacher="timm", model_name="vit_tiny_patch16_224", weights=str(weights),
                          model_kwargs=TEACHER_KWARGS, **extra)


def captured_block_output(module, block, run):
    """Output of `block` while `run()` executes `module`'s own forward."""
    seen = {}
    handle = block.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    try:
        run()
    finally:
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_timm_teacher_returns_the_chosen_blocks_tokens(teacher_file, layer, layer_norm):
    tokenizer = image_tokenizer(28, 4, 1)
    target = FeatureTarget(timm_options(teacher_file, layer=layer, layer_norm=layer_norm), tokenizer)
    assert target.out_dim == 192
    images = torch.randn(2, 1, 28, 28)
    values = target(tokenizer.tokenize(images), None).values
    reference = make_teacher().eval()  # same seed, same weights as the file
    with torch.no_grad():
        out = captured_block_output(reference, reference.blocks[layer], lambda: reference.forward_features(images))
    expected = out[:, reference.num_prefix_tokens:]  # cls token dropped
    if layer_norm:
        expected = F.layer_norm(expected, (192,), eps=1e-6)
    assert values.shape == (2, 49, 192)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_timm_teacher_reads_pth_checkpoints_with_a_nested_model_entry(tmp_path, teacher_file):
    path = tmp_path / "teacher.pth"
    torch.save({"model": make_teacher().state_dict(), "epoch": 3}, path)
    tokenizer = image_tokenizer(28, 4, 1)
    tokens = tokenizer.tokenize(torch.randn(1, 1, 28, 28))
    from_pth = FeatureTarget(timm_options(path), tokenizer)(tokens, None).values
    from_safetensors = FeatureTarget(timm_options(teacher_file), tokenizer)(tokens, None).values
    assert torch.equal(from_pth, from_safetensors)


def test_timm_teacher_runs_under_autocast_and_returns_fp32(teacher_file):
    tokenizer = image_tokenizer(28, 4, 1)
    tokens = tokenizer.tokenize(torch.randn(2, 1, 28, 28))
    target = FeatureTarget(timm_options(teacher_file, layer_norm=True), tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = target(tokens, None).values
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, target(tokens, None).values, atol=0.15, rtol=0.05)


def test_timm_teacher_grid_mismatch_and_missing_weights_are_clear_errors(tmp_path):
    coarse = tmp_path / "coarse.safetensors"
    save_file(make_teacher(patch_size=7).state_dict(), str(coarse))
    options = FeatureOptions(teacher="timm", model_name="vit_tiny_patch16_224", weights=str(coarse),
                             model_kwargs={**TEACHER_KWARGS, "patch_size": 7})
    with pytest.raises(ValueError, match=r"token grid \(4, 4\).*grid is \(7, 7\)"):
        FeatureTarget(options, image_tokenizer(28, 4, 1))
    missing = tmp_path / "nowhere" / "teacher.safetensors"
    with pytest.raises(ValueError, match=f"not found: {missing}"):
        FeatureTarget(timm_options(missing), image_tokenizer(28, 4, 1))
    with pytest.raises(RecipeError, match="nowhere/teacher.safetensors"):  # reported at the recipe's target
        prepare(QUICKSTART, tiny(tmp_path, "target.name=feature",
                                 f"target.options={{teacher: timm, model_name: vit_tiny_patch16_224, "
                                 f"weights: '{missing}'}}"))


def test_feature_options_are_checked_per_teacher_kind():
    with pytest.raises(ValidationError, match="requires model_name and weights"):
        FeatureOptions(teacher="timm")
    with pytest.raises(ValidationError, match="requires dim"):
        FeatureOptions(teacher="ema")
    with pytest.raises(ValidationError, match="momentum does not apply to teacher: timm"):
        FeatureOptions(teacher="timm", model_name="m", weights="w", momentum=0.9)
    with pytest.raises(ValidationError, match="weights does not apply to teacher: ema"):
        FeatureOptions(teacher="ema", dim=8, weights="w")


def train(tmp_path, *extra, resume=False) -> Pretrainer:
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *extra)), resume=resume)
    trainer.train()
    return trainer


def logged_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_timm_teacher_stays_frozen_while_the_encoder_trains(tmp_path, teacher_file):
    options = (f"target.options={{teacher: timm, model_name: vit_tiny_patch16_224, weights: '{teacher_file}', "
               "model_kwargs: {img_size: 28, patch_size: 4, in_chans: 1, depth: 2}, layer_norm: true}")
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, "target.name=feature", options, "runtime.max_steps=3")))
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    trainer.train()
    teacher = trainer.components.target.teacher
    saved = make_teacher().state_dict()
    assert trainer.step == 3
    assert all(torch.equal(value, saved[key]) for key, value in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(torch.equal(v, encoder_before[k]) for k, v in trainer.model.encoder.state_dict().items()
                   if k.startswith("blocks."))
    assert trainer.model.decoder.head.out_features == 192
    assert all(math.isfinite(loss) for loss in logged_losses(tmp_path / "quickstart"))
    assert trainer.state_dict()["components"]["target"]["state"] == {}  # the frozen weights stay in their file


# --- feature: EMA teacher --------------------------------------------------------------------------------

EMA_CONFIG = ModelConfig(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                         decoder_num_heads=2)


def ema_setup(seed=0, **options):
    torch.manual_seed(seed)
    tokenizer = image_tokenizer(16, 4, 3)
    target = FeatureTarget(FeatureOptions(teacher="ema", dim=32, **options), tokenizer)
    model = MaskedAutoencoder(tokenizer.spec, target.out_dim, EMA_CONFIG)
    target.attach(model)
    return tokenizer, target, model


def perturb(model):
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))


def test_ema_teacher_moves_by_exactly_m_teacher_plus_one_minus_m_student():
    _, target, model = ema_setup(momentum=0.9)
    teacher = target.teacher
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in model.parameters())
    perturb(model)
    before = [p.detach().double().clone() for p in teacher.parameters()]
    student = [p.detach().double().clone() for p in model.encoder.parameters()]
    target.set_progress(0, 0.0)
    for new, t, s in zip(teacher.parameters(), before, student, strict=True):
        torch.testing.assert_close(new.double(), 0.9 * t + 0.1 * s, atol=1e-6, rtol=1e-6)
    assert not torch.equal(before[0].float(), next(teacher.parameters()))


def test_ema_state_round_trips_through_state_dict_before_or_after_attach():
    _, target, model = ema_setup(momentum=0.5)
    for _ in range(3):
        perturb(model)
        target.set_progress(0, 0.0)
    buffer = io.BytesIO()
    torch.save(target.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"teacher"}

    # loaded after attach (the engine's resume order) and before attach (pending until attach)
    _, after, other = ema_setup(seed=1, momentum=0.5)
    after.load_state_dict(state)
    before = FeatureTarget(FeatureOptions(teacher="ema", dim=32, momentum=0.5), image_tokenizer(16, 4, 3))
    before.load_state_dict(state)
    before.attach(MaskedAutoencoder(before.tokenizer.spec, 32, EMA_CONFIG))
    for restored in (after, before):
        for key, value in target.teacher.state_dict().items():
            assert torch.equal(restored.teacher.state_dict()[key], value), key

    # the restored teacher keeps following its student in place
    other.load_state_dict(model.state_dict())
    target.set_progress(1, 0.0)
    after.set_progress(1, 0.0)
    for a, b in zip(target.teacher.parameters(), after.teacher.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expects state"):
        after.load_state_dict({"ema": {}})


@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_ema_teacher_returns_the_chosen_blocks_tokens_of_the_full_sequence(layer, layer_norm):
    tokenizer, target, model = ema_setup(layer=layer, layer_norm=layer_norm)
    tokens = tokenizer.tokenize(torch.randn(2, 3, 16, 16))
    mask = Mask.from_noise(torch.rand(2, 16), 4)  # the teacher ignores it: all 16 tokens
    values = target(tokens, mask).values
    encoder = model.encoder.eval()
    with torch.no_grad():
        out = captured_block_output(encoder, encoder.blocks[layer], lambda: encoder(tokens.patches))
    expected = out[:, 1:]  # cls token dropped
    if layer_norm:
        expected = F.layer_norm(expected, (32,), eps=1e-6)
    assert values.shape == (2, 16, 32)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_ema_teacher_must_fit_the_encoder_and_its_strategy(tmp_path):
    tokenizer = image_tokenizer(16, 4, 3)
    target = FeatureTarget(FeatureOptions(teacher="ema", dim=48), tokenizer)
    assert target.out_dim == 48
    with pytest.raises(ValueError, match="dim 48 does not match the encoder width 32"):
        target.attach(MaskedAutoencoder(tokenizer.spec, 48, EMA_CONFIG))
    with pytest.raises(RecipeError, match="target.options.dim.*must equal model.embed_dim 32"):
        prepare(QUICKSTART, tiny(tmp_path, "target.name=feature", "target.options={teacher: ema, dim: 48}"))
    with pytest.raises(RecipeError, match="target.options.layer"):
        prepare(QUICKSTART, tiny(tmp_path, "target.name=feature", "target.options={teacher: ema, dim: 32, layer: 1}"))
    with pytest.raises(RecipeError, match="target.options.teacher: the EMA teacher .* cannot be copied"):
        prepare(QUICKSTART, tiny(tmp_path, "target.name=feature", "target.options={teacher: ema, dim: 32}",
                                 "runtime.strategy=fsdp"))  # FSDP2 modules refuse deepcopy (was an AssertionError)


def test_ema_training_resumes_exactly(tmp_path):
    extra = ["target.name=feature", "target.options={teacher: ema, dim: 32, momentum: 0.9, layer_norm: true}",
             "optim.epochs=1"]
    straight = train(tmp_path / "a", *extra)
    train(tmp_path / "b", *extra, "runtime.max_steps=2")
    resumed = train(tmp_path / "b", *extra, resume=True)
    assert logged_losses(tmp_path / "b" / "quickstart") == logged_losses(tmp_path / "a" / "quickstart")
    teacher, student = straight.components.target.teacher, straight.model.encoder
    for key, value in teacher.state_dict().items():
        assert torch.equal(resumed.components.target.teacher.state_dict()[key], value), key
    assert not torch.equal(teacher.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)


# --- frequency -------------------------------------------------------------------------------------------

def frequency(mode, tokenizer=None, **options):
    return FrequencyTarget(FrequencyOptions(mode=mode, **options), tokenizer or image_tokenizer(8, 4, 3))


def test_frequency_out_dims():
    image, tube = image_tokenizer(8, 4, 3), tube_tokenizer(frames=4, size=8, tubelet=2, patch=4, channels=3)
    assert frequency("amplitude", image).out_dim == 3 * 4 * 3
    assert frequency("amplitude_phase", image).out_dim == 2 * 3 * 4 * 3
    assert frequency("lowpass", image).out_dim == frequency("highpass", image).out_dim == 48
    assert frequency("amplitude", tube).out_dim == 2 * 3 * 4 * 3
    assert frequency("highpass", tube).out_dim == 96
    for mode in ("amplitude", "amplitude_phase", "lowpass", "highpass"):
        for tokenizer, size in ((image, (2, 3, 8, 8)), (tube, (2, 3, 4, 8, 8))):
            target = frequency(mode, tokenizer)
            tokens = tokenizer.tokenize(torch.rand(*size))
            values = target(tokens, None).values
            assert values.shape == (2, tokenizer.spec.num_tokens, target.out_dim) and values.dtype == torch.float32
            assert target.reconstruct(values, tokens) is None


def test_amplitude_of_a_constant_patch_is_zero_except_dc():
    tokenizer = image_tokenizer(8, 4, 3)
    levels = torch.tensor([0.5, -2.0, 3.0])
    tokens = tokenizer.tokenize(levels.view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous())
    values = frequency("amplitude")(tokens, None).values.view(2, 4, 3, 4, 3)  # (C, p, q//2+1)
    expected = torch.zeros_like(values)
    expected[..., 0, 0] = levels.abs() * 4  # orthonormal DC = sqrt(p·q) · level
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    logged = frequency("amplitude", log=True)(tokens, None).values.view(2, 4, 3, 4, 3)
    torch.testing.assert_close(logged, torch.log1p(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q", [4, 5])
def test_parseval_the_amplitudes_carry_the_patch_energy(q):
    tokenizer = ImagePatchTokenizer(ImagePatchOptions(image_size=(8, 2 * q), patch_size=(4, q), channels=2))
    tokens = tokenizer.tokenize(torch.randn(3, 2, 8, 2 * q))
    amplitude = frequency("amplitude", tokenizer)(tokens, None).values.view(3, 4, 2, 4, q // 2 + 1)
    weight = torch.full((q // 2 + 1,), 2.0)  # each column stands for itself and its mirror image ...
    weight[0] = 1.0                          # ... except DC and, for even q, Nyquist
    if q % 2 == 0:
        weight[-1] = 1.0
    energy = (amplitude.pow(2) * weight).sum(dim=(-3, -2, -1))
    torch.testing.assert_close(energy, tokens.patches.pow(2).sum(-1), atol=1e-4, rtol=1e-5)


def test_amplitude_and_phase_invert_to_the_patch():
    tokenizer = image_tokenizer(8, 4, 3)
    tokens = tokenizer.tokenize(torch.randn(2, 3, 8, 8))
    values = frequency("amplitude_phase")(tokens, None).values
    amplitude, phase = values.view(2, 4, 2, 3, 4, 3).unbind(2)
    back = torch.fft.irfft2(torch.polar(amplitude, phase), s=(4, 4), norm="ortho")  # [B, N, C, p, q]
    torch.testing.assert_close(back.movedim(-3, -1).reshape(2, 4, 48), tokens.patches, atol=1e-5, rtol=0)
    flat = tokenizer.tokenize(torch.ones(1, 3, 8, 8))
    phase = frequency("amplitude_phase")(flat, None).values.view(1, 4, 2, 3, 4, 3)[:, :, 1]
    assert torch.equal(phase, torch.zeros_like(phase))  # undefined phases of empty frequencies are 0


@pytest.mark.parametrize("cutoff", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_lowpass_plus_highpass_is_the_patch(cutoff):
    tokenizer = tube_tokenizer(frames=2, size=8, tubelet=2, patch=4, channels=2)
    tokens = tokenizer.tokenize(torch.randn(2, 2, 2, 8, 8))
    low = frequency("lowpass", tokenizer, cutoff=cutoff)(tokens, None).values
    high = frequency("highpass", tokenizer, cutoff=cutoff)(tokens, None).values
    torch.testing.assert_close(low + high, tokens.patches, atol=1e-5, rtol=0)


def test_bands_split_a_constant_from_a_checkerboard():
    tokenizer = image_tokenizer(8, 4, 1)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float()  # Nyquist along both axes: radius √2
    tokens = tokenizer.tokenize((0.7 + 0.2 * checker).view(1, 1, 8, 8))
    low = frequency("lowpass", tokenizer, cutoff=1.0)(tokens, None).values
    high = frequency("highpass", tokenizer, cutoff=1.0)(tokens, None).values
    torch.testing.assert_close(low, torch.full_like(low, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(high, tokenizer.tokenize((0.2 * checker).view(1, 1, 8, 8)).patches, atol=1e-6, rtol=0)


def test_tubelets_are_transformed_frame_by_frame():
    tube = tube_tokenizer(frames=4, size=8, tubelet=2, patch=4, channels=3)
    image = image_tokenizer(8, 4, 3)
    video = torch.randn(2, 3, 4, 8, 8)
    values = frequency("amplitude", tube)(tube.tokenize(video), None).values.view(2, 2, 4, 2, -1)  # gt, gh·gw, t
    for frame in range(4):
        per_image = frequency("amplitude", image)(image.tokenize(video[:, :, frame]), None).values
        torch.testing.assert_close(values[:, frame // 2, :, frame % 2], per_image, atol=1e-6, rtol=0)


def test_norm_pix_normalises_each_patch_before_the_transform():
    tokenizer = image_tokenizer(8, 4, 3)
    tokens = tokenizer.tokenize(torch.rand(2, 3, 8, 8) * 4 + 1)
    patches = tokens.patches
    normal = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    for mode in ("amplitude", "highpass"):
        with_norm = frequency(mode, norm_pix=True)(tokens, None).values
        plain_of_normal = frequency(mode)(Tokens(normal, tokens.source), None).values
        torch.testing.assert_close(with_norm, plain_of_normal, atol=1e-5, rtol=0)


def test_frequency_runs_in_fp32_under_autocast_and_rejects_stray_options():
    tokenizer = image_tokenizer(8, 4, 3)
    tokens = tokenizer.tokenize(torch.rand(1, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = frequency("lowpass")(tokens, None).values
    assert mixed.dtype == torch.float32 and torch.equal(mixed, frequency("lowpass")(tokens, None).values)
    with pytest.raises(ValidationError, match="cutoff does not apply to mode amplitude"):
        FrequencyOptions(mode="amplitude", cutoff=0.2)
    with pytest.raises(ValidationError, match="log does not apply to mode lowpass"):
        FrequencyOptions(mode="lowpass", log=True)


# --- registration ----------------------------------------------------------------------------------------

def test_targets_are_registered_under_their_names():
    registry = Registry(make_plugin_manager())
    assert registry.get("target", "hog").cls is HOGTarget
    assert registry.get("target", "feature").cls is FeatureTarget
    assert registry.get("target", "frequency").cls is FrequencyTarget


EDGE_TARGET = """
from maeframe import Target, TargetOut, hookimpl

class Edges(Target):
    '''|patch - its mean|: a target in its own space (not pixels), which can draw itself.'''
    @property
    def out_dim(self):
        return self.tokenizer.spec.patch_dim
    def __call__(self, tokens, mask):
        patches = tokens.patches.float()
        return TargetOut((patches - patches.mean(-1, keepdim=True)).abs())
    def reconstruct(self, prediction, tokens):
        return prediction

@hookimpl
def register_targets(register):
    register("edges", Edges)
"""


def test_a_target_outside_pixel_space_is_drawn_in_its_own_space_and_not_scored_as_pixels(tmp_path, monkeypatch):
    """Its `reconstruct` is no picture of the input: no masked PSNR or high-frequency error ("n/a"), and the
    pictures show the true target beside the prediction instead of pasting the prediction into the image."""
    from maeframe.engine.evaluate import evaluate
    from maeframe.engine.visualize import reconstruction_panels

    (tmp_path / "edge_plugin.py").write_text(EDGE_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, "plugins=[edge_plugin]", "target={name: edges}",
                                                  "runtime.max_steps=2")))
    trainer.train()
    result = evaluate(trainer.model, trainer.prepared, limit=16, knn=False, panel_path=tmp_path / "eval.png")
    assert result["masked_psnr"] is None and result["hf_error"] is None and result["eval_loss/mse"] > 0
    assert trainer.visualize(tmp_path / "pictures.png") == [tmp_path / "pictures.png"]
    batch = torch.stack([trainer._visual_data[(i, 0)][0] for i in range(3)])
    with torch.no_grad():
        tokens, mask, prediction = trainer.predict(batch)
    target = trainer.components.target(tokens, mask)
    panels = reconstruction_panels(trainer.components, trainer._visual_data.dataset, tokens, mask, prediction, target)
    truth = trainer.components.tokenizer.untokenize(target.values)
    low = truth.flatten(1).min(1).values.view(-1, 1, 1, 1)
    assert panels.shape == (3, 4, 1, 28, 28) and float(panels[:, 2].max()) > 0.99   # scaled to [0, 1]
    assert torch.allclose(panels[:, 2] == 0, (truth == low) & (panels[:, 2] == 0))   # the true target, drawn
