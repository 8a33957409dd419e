import gzip

import pytest
import torch
from PIL import Image

from maeframe.engine.data import ResumableBatchSampler, SeededDataset
from maeframe_plugins.image_data import (FashionMNISTDataset, FashionMNISTOptions, ImageFolderDataset,
                                         ImageFolderOptions, read_idx)


def test_fashion_mnist_is_real_and_labelled():
    data = FashionMNISTDataset(FashionMNISTOptions(split="test"), (1, 28, 28), train=False)
    assert len(data) == 10_000
    image, label = data[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first test image is an ankle boot
    assert torch.allclose(data.denormalize(image[None])[0], data.images[0].float()[None] / 255, atol=1e-5)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataset(FashionMNISTOptions(root=str(tmp_path)), (1, 28, 28), train=True)


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    path.write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_image_folder_with_rgb_and_grayscale_tokenizers(tmp_path):
    for cls, color in [("cats", (200, 10, 10)), ("dogs", (10, 10, 200))]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), color).save(tmp_path / cls / f"{i}.png")
    rgb = ImageFolderDataset(ImageFolderOptions(root=str(tmp_path)), (3, 16, 16), train=True)
    assert len(rgb) == 4 and rgb.classes == ["cats", "dogs"]
    image, label = rgb[3]
    assert image.shape == (3, 16, 16) and label == 1
    gray = ImageFolderDataset(ImageFolderOptions(root=str(tmp_path), mean=(0.5,), std=(0.5,)), (1, 16, 16), False)
    assert gray[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="mean: 3 values but the tokenizer expects 1 channels.*image-stats"):
        ImageFolderDataset(ImageFolderOptions(root=str(tmp_path)), (1, 16, 16), train=True)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolderDataset(ImageFolderOptions(root=str(tmp_path / "absent")), (3, 16, 16), train=True)


def test_batches_depend_only_on_seed_epoch_and_position():
    sampler = ResumableBatchSampler(100, 8, seed=3)
    epoch0 = list(sampler)
    assert len(epoch0) == 12 and sorted(i for b in epoch0 for i, _ in b) == sorted(set(i for b in epoch0 for i, _ in b))
    sampler.start(0, 5)
    assert list(sampler) == epoch0[5:]
    sampler.start(1)
    assert list(sampler) != epoch0


def test_augmentation_is_seeded_per_sample_without_touching_the_global_rng():
    data = FashionMNISTDataset(FashionMNISTOptions(split="test", limit=4), (1, 28, 28), train=True)
    seeded = SeededDataset(data)
    state = torch.get_rng_state()
    first, again, other = seeded[(1, 123)][0], seeded[(1, 123)][0], seeded[(1, 124)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)
