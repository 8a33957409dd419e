import torch

from maeframe import Mask, Prediction, TargetOut
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.losses import MaskedMSE
from maeframe_plugins.targets import PixelOptions, PixelTarget

TOKENIZER = ImagePatchTokenizer(ImagePatchOptions(image_size=16, patch_size=4, channels=3))


def test_norm_pix_normalises_each_patch_with_unbiased_variance():
    tokens = TOKENIZER.tokenize(torch.rand(2, 3, 16, 16) * 5 + 2)
    target = PixelTarget(PixelOptions(norm_pix=True), TOKENIZER)
    values = target(tokens, None).values
    assert target.out_dim == 48
    assert torch.allclose(values.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(values.var(-1), torch.ones(2, 16), atol=1e-3)
    patches = tokens.patches
    expected = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(values, expected)
    assert torch.allclose(target.reconstruct(values, tokens), patches, atol=1e-5)


def test_plain_pixel_target_is_the_patches():
    tokens = TOKENIZER.tokenize(torch.rand(1, 3, 16, 16))
    target = PixelTarget(PixelOptions(norm_pix=False), TOKENIZER)
    assert torch.equal(target(tokens, None).values, tokens.patches)


def test_mse_counts_only_hidden_tokens():
    hidden = torch.zeros(2, 16, dtype=torch.bool)
    hidden[:, :4] = True
    mask = Mask.from_bool(hidden)
    target = TargetOut(torch.zeros(2, 16, 8))
    values = torch.zeros(2, 16, 8)
    values[:, :4] = 2.0          # hidden tokens: error 4 each
    values[:, 4:] = 100.0        # visible tokens must not count
    loss = MaskedMSE(MaskedMSE.Options(), TOKENIZER)(Prediction(values, None), target, mask)
    assert loss.item() == 4.0
