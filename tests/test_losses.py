"""The loss library: l1, smooth_l1, cosine (plugins/losses.py), laplacian, uniformity.

Each loss is checked against its defining properties and hand-computed values on tiny tensors, then all
of them together in a real (tiny) pretraining run on Fashion-MNIST.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from maeframe import Mask, Prediction, TargetOut
from maeframe.build import prepare
from maeframe.engine.pretrain import Pretrainer
from maeframe.plugins import make_plugin_manager
from maeframe.registry import Registry
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.laplacian import LaplacianOptions, MaskedLaplacian
from maeframe_plugins.losses import MaskedCosine, MaskedL1, MaskedSmoothL1
from maeframe_plugins.targets import PixelOptions, PixelTarget
from maeframe_plugins.uniformity import Uniformity
from maeframe_plugins.video import VideoTubeOptions, VideoTubeTokenizer
from conftest import QUICKSTART, tiny

# 8×8 single-channel images in 4×4 patches: a 2×2 grid of 16-value tokens.
GRAY = ImagePatchTokenizer(ImagePatchOptions(image_size=8, patch_size=4, channels=1))
# 4×4 single-channel images in 2×2 patches: 2×2 grid, every pixel touches a patch border.
SMALL = ImagePatchTokenizer(ImagePatchOptions(image_size=4, patch_size=2, channels=1))
RGB = ImagePatchTokenizer(ImagePatchOptions(image_size=12, patch_size=4, channels=3))


def hide(batch: int, tokens: int, hidden: list[int]) -> Mask:
    """The same tokens hidden in every sample."""
    masked = torch.zeros(batch, tokens, dtype=torch.bool)
    masked[:, hidden] = True
    return Mask.from_bool(masked)


def hide_all(batch: int, tokens: int) -> Mask:
    return hide(batch, tokens, list(range(tokens)))


def call(loss, values, target, mask, latent=None):
    return loss(Prediction(values, latent), TargetOut(target), mask)


# --- l1, smooth_l1, cosine ------------------------------------------------------------------------

REGRESSION = [MaskedL1(MaskedL1.Options(), GRAY),
              MaskedSmoothL1(MaskedSmoothL1.Options(beta=0.5), GRAY),
              MaskedCosine(MaskedCosine.Options(), GRAY)]


@pytest.mark.parametrize("loss", REGRESSION + [MaskedLaplacian(LaplacianOptions(within_patch=True), GRAY)],
                         ids=lambda loss: type(loss).__name__)
def test_visible_predictions_do_not_count(loss):
    torch.manual_seed(0)
    mask = hide(3, 4, [0, 3])
    values, target = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    before = call(loss, values, target, mask)
    changed = values.clone()
    changed[:, [1, 2]] = 100 * torch.randn(3, 2, 16)
    assert before.dtype == torch.float32 and before.dim() == 0
    assert torch.allclose(call(loss, changed, target, mask), before, rtol=0, atol=1e-6)


def test_l1_is_the_mean_absolute_error_of_hidden_tokens():
    mask = hide(2, 4, [1])
    target = torch.zeros(2, 4, 16)
    values = torch.full((2, 4, 16), 7.0)
    values[0, 1, :8], values[0, 1, 8:] = 1.0, -3.0        # sample 0 hidden token: mean |error| 2
    values[1, 1] = 0.5                                    # sample 1 hidden token: mean |error| 0.5
    loss = call(REGRESSION[0], values, target, mask)
    assert loss.item() == pytest.approx((2.0 + 0.5) / 2)


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_smooth_l1_is_quadratic_below_beta_and_linear_above(beta):
    loss = MaskedSmoothL1(MaskedSmoothL1.Options(beta=beta), GRAY)
    mask = hide_all(1, 4)
    for x in [0.1 * beta, 0.5 * beta, 0.99 * beta, -0.7 * beta]:
        value = call(loss, torch.full((1, 4, 16), x), torch.zeros(1, 4, 16), mask)
        assert value.item() == pytest.approx(0.5 * x * x / beta, rel=1e-5)
    for x in [1.01 * beta, 2 * beta, -5 * beta, 10.0 + beta]:
        value = call(loss, torch.full((1, 4, 16), x), torch.zeros(1, 4, 16), mask)
        assert value.item() == pytest.approx(abs(x) - beta / 2, rel=1e-5)


def test_smooth_l1_averages_per_token_then_over_hidden_tokens():
    loss = MaskedSmoothL1(MaskedSmoothL1.Options(), GRAY)   # beta 1
    mask = hide(1, 4, [0, 2])
    values = torch.zeros(1, 4, 16)
    values[0, 0, :4] = 0.5       # 4 elements of 0.125, 12 of 0: token mean 0.03125
    values[0, 2, :2] = 3.0       # 2 elements of 2.5: token mean 0.3125
    values[0, 1] = 9.0           # visible
    assert call(loss, values, torch.zeros(1, 4, 16), mask).item() == pytest.approx((0.03125 + 0.3125) / 2)
    with pytest.raises(ValueError):
        MaskedSmoothL1.Options(beta=0)


def test_cosine_is_zero_when_parallel_two_when_opposite_one_when_orthogonal():
    loss = REGRESSION[2]
    mask = hide_all(2, 4)
    target = torch.randn(2, 4, 16)
    assert call(loss, 3.7 * target, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert call(loss, -0.2 * target, target, mask).item() == pytest.approx(2.0, abs=1e-6)
    basis = torch.eye(16)
    ortho = call(loss, basis[0].expand(2, 4, 16), basis[1].expand(2, 4, 16), mask)
    assert ortho.item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_is_scale_invariant_and_matches_a_hand_value():
    loss = REGRESSION[2]
    torch.manual_seed(1)
    mask = hide(2, 4, [0, 1])
    values, target = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    base = call(loss, values, target, mask)
    scale = torch.rand(2, 4, 1) * 10 + 0.1                 # a different positive scale per token
    assert torch.allclose(call(loss, values * scale, target * scale.flip(1), mask), base, atol=1e-6)
    hidden_v, hidden_t = values[:, :2], target[:, :2]
    cos = (hidden_v * hidden_t).sum(-1) / (hidden_v.norm(dim=-1) * hidden_t.norm(dim=-1))
    assert base.item() == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    zero = call(loss, torch.zeros(2, 4, 16), target, mask)   # eps keeps an all-zero prediction finite
    assert zero.item() == pytest.approx(1.0)


# --- laplacian -------------------------------------------------------------------------------------

def lap_loss(tokenizer, within_patch: bool) -> MaskedLaplacian:
    return MaskedLaplacian(LaplacianOptions(within_patch=within_patch), tokenizer)


def lap_images(tokenizer, prediction_image, target_image, mask, within_patch):
    """The loss for images [B, C, H, W], tokenized with the tokenizer."""
    return call(lap_loss(tokenizer, within_patch), tokenizer.tokenize(prediction_image).patches,
                tokenizer.tokenize(target_image).patches, mask)


def reference_laplacian(images: torch.Tensor) -> torch.Tensor:
    """F.conv2d with the 3×3 kernel and replicate padding, per channel; images [B, C, H, W]."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(flat, kernel).reshape(b, c, h, w)


def reference_laplacian_per_patch(images: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """The same, applied to every p×q patch as a separate image."""
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // p, p, w // q, q).permute(0, 1, 2, 4, 3, 5).reshape(-1, 1, p, q)
    filtered = reference_laplacian(patches).reshape(b, c, h // p, w // q, p, q).permute(0, 1, 2, 4, 3, 5)
    return filtered.reshape(b, c, h, w)


@pytest.mark.parametrize("within_patch", [True, False])
def test_laplacian_of_constant_images_is_zero(within_patch):
    mask = hide(2, 9, [0, 4, 8])
    prediction, target = torch.full((2, 3, 12, 12), 3.0), torch.full((2, 3, 12, 12), -1.5)
    assert lap_images(RGB, prediction, target, mask, within_patch).item() == 0.0


@pytest.mark.parametrize("within_patch, expected", [(False, 7.0), (True, 6.0)])
def test_laplacian_of_a_checkerboard_against_a_constant(within_patch, expected):
    """±1 checkerboard, 8×8: |Δ| = 8 inside, 6 on an edge, 4 in a corner (replicate padding).
    Whole image: (36·8 + 24·6 + 4·4) / 64 = 7. Each 4×4 patch alone: (4·8 + 8·6 + 4·4) / 16 = 6."""
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    board = (1 - 2 * ((rows + cols) % 2)).float().view(1, 1, 8, 8)
    loss = lap_images(GRAY, board, torch.full_like(board, 0.3), hide_all(1, 4), within_patch)
    assert loss.item() == pytest.approx(expected)


def test_laplacian_within_patch_differs_from_global_at_patch_borders():
    """A unit spike at pixel (1, 1) of a 4×4 image in 2×2 patches, i.e. the corner of the top-left patch.
    Whole image: centre -4, four neighbours +1 -> |Δ| sums to 8 over 16 pixels. Within the patch only two
    neighbours exist; the other two replicate the spike -> centre -2, two neighbours +1 -> 4 / 16."""
    spike = torch.zeros(1, 1, 4, 4)
    spike[0, 0, 1, 1] = 1.0
    zero, mask = torch.zeros_like(spike), hide_all(1, 4)
    assert lap_images(SMALL, spike, zero, mask, within_patch=False).item() == pytest.approx(0.5)
    assert lap_images(SMALL, spike, zero, mask, within_patch=True).item() == pytest.approx(0.25)
    # Away from patch borders (pixel (1, 1) of a 4×4 patch) both modes agree: 8 / 64.
    inner = torch.zeros(1, 1, 8, 8)
    inner[0, 0, 1, 1] = 1.0
    for within_patch in (True, False):
        assert lap_images(GRAY, inner, torch.zeros_like(inner), hide_all(1, 4), within_patch).item() == \
            pytest.approx(8 / 64)


def test_laplacian_within_patch_ignores_per_patch_offsets_like_norm_pix():
    """Every patch a different constant (what per-patch normalisation does to a smooth image): filtered
    per patch there is nothing to match; filtered globally the jumps at patch borders count."""
    steps = torch.tensor([[0.0, 2.0], [-1.0, 5.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1).view(1, 1, 8, 8)
    flat, mask = torch.zeros_like(steps), hide_all(1, 4)
    assert lap_images(GRAY, steps, flat, mask, within_patch=True).item() == 0.0
    assert lap_images(GRAY, steps, flat, mask, within_patch=False).item() > 0.5


def test_laplacian_matches_conv2d_with_replicate_padding():
    torch.manual_seed(2)
    prediction, target = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12)
    mask = hide_all(2, 9)
    difference = prediction - target
    expected_global = reference_laplacian(difference).abs().mean()
    expected_patch = reference_laplacian_per_patch(difference, 4, 4).abs().mean()
    assert lap_images(RGB, prediction, target, mask, False).item() == pytest.approx(expected_global.item(), rel=1e-5)
    assert lap_images(RGB, prediction, target, mask, True).item() == pytest.approx(expected_patch.item(), rel=1e-5)


def test_laplacian_averages_over_hidden_pixels_only():
    torch.manual_seed(3)
    target = torch.randn(2, 3, 12, 12)
    prediction = target.clone()
    mask = hide(2, 9, [4])                                  # the centre patch: rows/cols 4..7
    # An error well inside a visible patch (pixel (1, 1) of the top-left patch) reaches no hidden pixel.
    prediction[:, :, 1, 1] += 10.0
    for within_patch in (True, False):
        assert lap_images(RGB, prediction, target, mask, within_patch).item() == 0.0
    # An error at pixel (5, 5), inside the hidden patch: |Δ| sums to 8 per channel and sample, divided
    # by the 2·3·16 hidden pixel values.
    prediction = target.clone()
    prediction[:, :, 5, 5] += 1.0
    for within_patch in (True, False):
        assert lap_images(RGB, prediction, target, mask, within_patch).item() == pytest.approx(8 / 16)
    # Globally, a hidden border pixel reads its visible neighbour: an error at (3, 5), the visible pixel
    # just above the hidden patch, shows at hidden pixel (4, 5) with weight 1 -> 2·3·1 / 96.
    prediction = target.clone()
    prediction[:, :, 3, 5] += 1.0
    assert lap_images(RGB, prediction, target, mask, within_patch=False).item() == pytest.approx(1 / 16)
    assert lap_images(RGB, prediction, target, mask, within_patch=True).item() == 0.0


def test_laplacian_filters_every_frame_of_a_video_separately():
    video = VideoTubeTokenizer(VideoTubeOptions(num_frames=4, image_size=4, tubelet=2, patch_size=2, channels=2))
    assert torch.equal(video.untokenize(video.tokenize(torch.arange(256.0).view(2, 2, 4, 4, 4)).patches),
                       torch.arange(256.0).view(2, 2, 4, 4, 4))
    mask = hide_all(2, video.spec.num_tokens)
    frames = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(2, 2, 4, 4, 4)   # each frame one constant
    for within_patch in (True, False):
        loss = lap_loss(video, within_patch)
        value = call(loss, video.tokenize(frames).patches, torch.zeros(2, 8, 16), mask)
        assert value.item() == 0.0                     # the filter never mixes frames
    spike = torch.zeros(2, 2, 4, 4, 4)
    spike[:, :, 2, 1, 1] = 1.0                         # 2×2 patches: (1, 1) is a patch corner
    for within_patch, total in ((False, 8.0), (True, 4.0)):
        value = call(lap_loss(video, within_patch), video.tokenize(spike).patches, torch.zeros(2, 8, 16), mask)
        assert value.item() == pytest.approx(total / 64)   # per sample and channel: 64 pixels


def test_laplacian_rejects_targets_outside_patch_space():
    loss = lap_loss(GRAY, True)
    with pytest.raises(ValueError, match="patch space"):
        call(loss, torch.zeros(1, 4, 9), torch.zeros(1, 4, 9), hide_all(1, 4))   # e.g. HOG features


def test_laplacian_on_norm_pix_targets_is_zero_for_a_perfect_prediction_and_has_gradients():
    torch.manual_seed(4)
    tokens = RGB.tokenize(torch.rand(2, 3, 12, 12))
    target = PixelTarget(PixelOptions(norm_pix=True), RGB)(tokens, None)
    mask = hide(2, 9, [1, 2, 5])
    assert call(lap_loss(RGB, True), target.values.clone(), target.values, mask).item() == 0.0
    values = torch.randn(2, 9, 48, requires_grad=True)
    call(lap_loss(RGB, True), values, target.values, mask).backward()
    assert values.grad[:, [1, 2, 5]].abs().sum() > 0 and values.grad[:, [0, 3, 4, 6, 7, 8]].abs().sum() == 0


# --- uniformity ------------------------------------------------------------------------------------

def uniformity(latent, t=2.0):
    return Uniformity(Uniformity.Options(t=t), GRAY)(Prediction(None, latent), None, None)


def with_cls(features: torch.Tensor, visible: int = 3) -> torch.Tensor:
    """latent [B, 1 + visible, D] whose visible tokens average to features [B, D], plus a random cls."""
    noise = torch.randn(features.shape[0], visible, features.shape[1])
    tokens = features[:, None] + noise - noise.mean(dim=1, keepdim=True)
    return torch.cat([torch.randn(features.shape[0], 1, features.shape[1]) * 50, tokens], dim=1)


def test_uniformity_of_identical_features_is_zero_its_maximum():
    torch.manual_seed(5)
    feature = torch.randn(1, 8)
    scales = torch.rand(6, 1) + 0.5                      # lengths do not matter after normalisation
    assert uniformity(with_cls(feature * scales)).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
def test_uniformity_of_an_antipodal_pair_is_minus_four_t(t):
    torch.manual_seed(6)
    v = torch.randn(1, 8)
    assert uniformity(with_cls(torch.cat([v, -3 * v])), t).item() == pytest.approx(-4 * t, rel=1e-5)


def test_uniformity_matches_wang_isola_and_stays_in_bounds():
    torch.manual_seed(7)
    for batch, t in [(2, 2.0), (5, 2.0), (16, 0.7), (64, 3.0)]:
        latent = torch.randn(batch, 5, 12)
        z = F.normalize(latent[:, 1:].mean(1), dim=-1)
        expected = torch.pdist(z).pow(2).mul(-t).exp().mean().log()     # the paper's formulation
        value = uniformity(latent, t)
        assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
        assert -4 * t <= value.item() <= 0
    # Two antipodal pairs in a batch of 4: pairs at distance² 4 (4 of 12 ordered pairs) and 2 (8 of 12).
    e = torch.eye(8)[:2]
    value = uniformity(with_cls(torch.stack([e[0], -e[0], e[1], -e[1]])), t=1.0)
    assert value.item() == pytest.approx(math.log((4 * math.exp(-4) + 8 * math.exp(-2)) / 12), rel=1e-5)


def test_uniformity_reads_the_mean_of_visible_tokens_not_the_cls_token():
    torch.manual_seed(8)
    latent = torch.randn(4, 6, 8)
    changed = latent.clone()
    changed[:, 0] = torch.randn(4, 8) * 100
    assert uniformity(changed).item() == pytest.approx(uniformity(latent).item(), abs=1e-6)
    shuffled = latent[:, [0, 3, 1, 5, 2, 4]]             # visible tokens in another order: same mean
    assert uniformity(shuffled).item() == pytest.approx(uniformity(latent).item(), abs=1e-6)


def test_uniformity_is_stable_for_large_t():
    torch.manual_seed(9)
    value = uniformity(torch.randn(8, 4, 16), t=500.0)
    assert math.isfinite(value.item()) and -2000 <= value.item() <= 0


def test_uniformity_needs_two_samples():
    with pytest.raises(ValueError, match="batch size >= 2"):
        uniformity(torch.randn(1, 4, 8))


def test_uniformity_gradients_reach_the_visible_latent_tokens():
    torch.manual_seed(10)
    latent = torch.randn(6, 4, 8, requires_grad=True)
    uniformity(latent).backward()
    assert torch.isfinite(latent.grad).all()
    assert latent.grad[:, 1:].abs().sum() > 0
    assert latent.grad[:, 0].abs().sum() == 0


def test_uniformity_under_bf16_latents_computes_in_fp32():
    latent = torch.randn(4, 3, 8).bfloat16()
    value = uniformity(latent)
    assert value.dtype == torch.float32


# --- registration and a real run -------------------------------------------------------------------

def test_losses_are_registered_with_described_options():
    registry = Registry(make_plugin_manager())
    expected = {"l1": MaskedL1, "smooth_l1": MaskedSmoothL1, "cosine": MaskedCosine,
                "laplacian": MaskedLaplacian, "uniformity": Uniformity}
    for name, cls in expected.items():
        entry = registry.get("loss", name)
        assert entry.cls is cls
        for field, info in cls.Options.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
    assert Uniformity.Options().t == 2.0 and MaskedLaplacian.Options().within_patch is True


def test_tiny_run_logs_every_term_and_their_weighted_sum(tmp_path):
    losses = "losses=[{name: mse}, {name: laplacian, weight: 0.05}, {name: uniformity, weight: 0.01}]"
    extra = [losses, "target={name: pixel, options: {norm_pix: true}}", "optim.epochs=1", "optim.warmup_epochs=0.5",
             "runtime.device=cpu"]
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *extra)))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert {"loss/mse", "loss/laplacian", "loss/uniformity"} <= set(line)
        combined = line["loss/mse"] + 0.05 * line["loss/laplacian"] + 0.01 * line["loss/uniformity"]
        assert line["loss"] == pytest.approx(combined, abs=1e-5)
        assert line["loss/laplacian"] > 0 and -8 <= line["loss/uniformity"] <= 0
