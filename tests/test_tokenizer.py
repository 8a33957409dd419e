import pytest
import torch

from maeframe.errors import RecipeError
from maeframe.build import prepare
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from conftest import QUICKSTART


def reference_patchify(images: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """The MAE reference layout written independently: (h, w, p, q, c) order via einsum."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // q, q)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // q), p * q * c)


@pytest.mark.parametrize("size,patch,channels", [(32, 8, 3), ((24, 40), 8, 1), ((12, 20), (4, 5), 3)])
def test_round_trip_and_reference_layout(size, patch, channels):
    tokenizer = ImagePatchTokenizer(ImagePatchOptions(image_size=size, patch_size=patch, channels=channels))
    images = torch.randn(2, *tokenizer.input_shape)
    tokens = tokenizer.tokenize(images)
    spec = tokenizer.spec
    assert tokens.patches.shape == (2, spec.num_tokens, spec.patch_dim)
    assert torch.equal(tokenizer.untokenize(tokens.patches), images)
    p, q = spec.patch_size
    assert torch.equal(tokens.patches, reference_patchify(images, p, q))


def test_grid_of_non_square_image():
    tokenizer = ImagePatchTokenizer(ImagePatchOptions(image_size=(32, 64), patch_size=16, channels=3))
    assert tokenizer.spec.grid == (2, 4)
    assert tokenizer.spec.patch_dim == 16 * 16 * 3


def test_wrong_input_shape_is_a_clear_error():
    tokenizer = ImagePatchTokenizer(ImagePatchOptions(image_size=32, patch_size=8, channels=3))
    with pytest.raises(ValueError, match=r"expects \[B, 3, 32, 32\]"):
        tokenizer.tokenize(torch.zeros(1, 1, 32, 32))


def test_patch_not_dividing_image_names_the_field():
    with pytest.raises(RecipeError) as err:
        prepare(QUICKSTART, ["tokenizer.options.patch_size=5"])
    assert err.value.problems[0][0] == "tokenizer.options"
    assert "patch height 5 does not divide image height 28" in str(err.value)
