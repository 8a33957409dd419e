"""The packed data path: `maeframe pack`, the `packed` dataset and the batched device augmentation."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from maeframe.build import build_dataset, prepare
from maeframe.cli import main
from maeframe.engine.run import run_task
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError, RecipeError
from maeframe_plugins.device_augment import DeviceAugment, resized_crop, sample_crop_boxes
from maeframe_plugins.image_data import FASHION_MNIST_ROOT, load_fashion_mnist
from maeframe_plugins.pack import pack
from conftest import RECIPES, tiny

PACKED = RECIPES / "quickstart_packed.yaml"


def write_image_folder(root, count=30):
    """`count` real Fashion-MNIST images as 40×32 RGB PNGs in class folders, plus one corrupt PNG."""
    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    for i in range(count):
        folder = root / f"class{labels[i] % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").resize((40, 32), Image.BICUBIC).save(folder / f"{i:03d}.png")
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def decode_resize(path, size):
    """The reference: PIL decode, short side to `size` (bicubic, antialias), centre crop."""
    image = v2.functional.pil_to_tensor(Image.open(path).convert("RGB"))
    image = v2.functional.resize(image, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.center_crop(image, [size, size])


@pytest.fixture(scope="module")
def packed_fmnist(tmp_path_factory):
    """The first 64 real Fashion-MNIST training images, packed at 28×28 through the CLI."""
    out = tmp_path_factory.mktemp("packed") / "fmnist"
    assert main(["pack", FASHION_MNIST_ROOT, str(out), "--format", "fashion_mnist", "--channels", "1",
                 "--size", "28", "--option", "limit=64", "--shard-size", "24"]) == 0
    return out


# --- maeframe pack ----------------------------------------------------------------------------------


def test_pack_stores_what_a_direct_decode_and_resize_gives(tmp_path, caplog):
    root = write_image_folder(tmp_path / "src")
    index = pack(str(root), tmp_path / "out", size=24, workers=2, shard_size=8, max_bad_fraction=0.05)
    folder = datasets.ImageFolder(str(root))
    assert index["read"] == 31 and index["count"] == 30 and index["skipped_count"] == 1
    assert index["skipped"][0]["source"].endswith("broken.png") and "broken.png" in caplog.text
    assert [s["count"] for s in index["shards"]] == [8, 8, 8, 6] and index["shape"] == [3, 24, 24]
    assert index["classes"] == folder.classes
    on_disk = json.loads((tmp_path / "out" / "index.json").read_text())
    assert on_disk["labels"] == index["labels"]
    sources = (tmp_path / "out" / "sources.txt").read_text().splitlines()
    stored = np.concatenate([np.load(tmp_path / "out" / s["file"], mmap_mode="r") for s in on_disk["shards"]])
    expected_labels = dict(folder.samples)
    for i, path in enumerate(sources):
        assert torch.equal(torch.from_numpy(stored[i]), decode_resize(path, 24)), path
        assert index["labels"][i] == expected_labels[path]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_pack_fails_above_the_bad_fraction_and_writes_nothing(tmp_path):
    root = write_image_folder(tmp_path / "src", count=10)
    with pytest.raises(MaeframeError, match=r"1 of 11 source images are unreadable.*broken\.png"):
        pack(str(root), tmp_path / "out", size=16, max_bad_fraction=0.01)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_pack_refuses_an_existing_output(tmp_path, packed_fmnist):
    with pytest.raises(MaeframeError, match=str(packed_fmnist)):
        pack(FASHION_MNIST_ROOT, packed_fmnist, size=28, fmt="fashion_mnist", channels=1)


def test_pack_cli_names_an_unknown_format(tmp_path, capsys):
    assert main(["pack", str(tmp_path), str(tmp_path / "out"), "--size", "8", "--format", "jpeg_soup"]) == 2
    assert "jpeg_soup" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_packed_fashion_mnist_holds_the_raw_images(packed_fmnist):
    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "train")
    index = json.loads((packed_fmnist / "index.json").read_text())
    stored = np.concatenate([np.load(packed_fmnist / s["file"]) for s in index["shards"]])
    assert np.array_equal(stored[:, 0], images[:64]) and index["labels"] == labels[:64].tolist()


# --- the packed dataset ------------------------------------------------------------------------------


def test_packed_dataset_serves_uint8_for_training_and_normalised_floats_for_eval(tmp_path, packed_fmnist):
    prepared = prepare(PACKED, tiny(tmp_path, f"data.train.options.path={packed_fmnist}"))
    train, held_out = build_dataset(prepared, "train"), build_dataset(prepared, "eval")
    image, label = train[5]
    raw, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "train")
    assert image.dtype == torch.uint8 and torch.equal(image[0], torch.from_numpy(raw[5].copy())) and label == labels[5]
    assert train.device_transform is not None and held_out.device_transform is None
    evaluated, _ = held_out[5]
    assert evaluated.dtype == torch.float32
    assert torch.allclose(evaluated[0], (torch.from_numpy(raw[5].copy()) / 255 - 0.2860) / 0.3530, atol=1e-6)


def test_missing_index_or_bad_shard_names_the_path(tmp_path, packed_fmnist):
    with pytest.raises(RecipeError, match=rf"data\.train\.options\.path: packed: .*{tmp_path / 'nowhere'}"):
        build_dataset(prepare(PACKED, tiny(tmp_path, f"data.train.options.path={tmp_path / 'nowhere'}")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=rf"{tmp_path / 'empty' / 'index.json'} not found"):
        build_dataset(prepare(PACKED, tiny(tmp_path, f"data.train.options.path={tmp_path / 'empty'}")))
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in packed_fmnist.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    with open(broken / "shard-00001.npy", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(RecipeError, match=rf"shard {broken / 'shard-00001.npy'} has 100 bytes"):
        build_dataset(prepare(PACKED, tiny(tmp_path, f"data.train.options.path={broken}")))


def test_verify_detects_a_changed_shard(tmp_path, packed_fmnist):
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in packed_fmnist.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    data = bytearray((changed / "shard-00000.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel differs
    (changed / "shard-00000.npy").write_bytes(bytes(data))
    overrides = tiny(tmp_path, f"data.train.options.path={changed}")
    build_dataset(prepare(PACKED, overrides))  # the size check passes
    with pytest.raises(RecipeError, match=rf"shard {changed / 'shard-00000.npy'} does not match its SHA-256"):
        build_dataset(prepare(PACKED, [*overrides, "data.train.options.verify=true"]))


# --- the device RandomResizedCrop ---------------------------------------------------------------------


def test_crop_boxes_have_mae_area_and_aspect():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 48, 64, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    top, left, h, w = boxes.unbind(1)
    area, aspect = h * w / (48 * 64), w / h
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 1 + 1e-5
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48 + 1e-4).all() and (left + w <= 64 + 1e-4).all()
    assert area.min() < 0.21 and area.max() > 0.95  # the whole range is drawn
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    square = sample_crop_boxes(20000, 64, 64, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    log_aspect = (square[:, 3] / square[:, 2]).log()  # log-uniform aspect: symmetric about 0 on a square
    assert abs(log_aspect.mean()) < 0.01


def test_crop_boxes_fall_back_to_a_centred_clamped_box():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(4, 10, 40, (1.0, 1.0), (3 / 4, 4 / 3), generator)  # full area never fits 4:1
    assert torch.allclose(boxes, torch.tensor([[0.0, (40 - 40 / 3) / 2, 10.0, 40 / 3]]).expand(4, 4))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_identity_crop_reproduces_the_image_and_flip_mirrors_it(mode):
    images = torch.from_numpy(load_fashion_mnist(FASHION_MNIST_ROOT, "test")[0][:6].copy())[:, None]
    whole = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).expand(6, 4)
    same = resized_crop(images, whole, torch.zeros(6, dtype=torch.bool), (28, 28), mode)
    assert torch.allclose(same, images.float(), atol=1e-3)  # up to float32 rounding of the sampling grid
    assert torch.equal(same.round().to(torch.uint8), images)
    mirrored = resized_crop(images, whole, torch.ones(6, dtype=torch.bool), (28, 28), mode)
    assert torch.equal(mirrored.round().to(torch.uint8), images.flip(-1))
    boxes = torch.tensor([[3.0, 5.0, 17.0, 20.0]]).expand(6, 4)
    crop = resized_crop(images, boxes, torch.zeros(6, dtype=torch.bool), (24, 24), mode)
    flipped = resized_crop(images, boxes, torch.ones(6, dtype=torch.bool), (24, 24), mode)
    assert torch.allclose(flipped, crop.flip(-1), atol=1e-4)


def test_crop_matches_torchvision_resized_crop_inside_the_box():
    """Same sampling positions as torchvision's resized_crop (interpolate, no antialias); only the border
    pixels differ, where the device crop reads the real neighbours and torchvision repeats the edge."""
    images = torch.from_numpy(load_fashion_mnist(FASHION_MNIST_ROOT, "test")[0][:4].copy())[:, None].float()
    ours = resized_crop(images, torch.tensor([[4.0, 2.0, 16.0, 12.0]]).expand(4, 4),
                        torch.zeros(4, dtype=torch.bool), (32, 24), "bilinear")
    theirs = v2.functional.resized_crop(images, 4, 2, 16, 12, [32, 24], v2.InterpolationMode.BILINEAR,
                                        antialias=False)
    assert torch.allclose(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-3)
    assert not torch.allclose(ours, torch.roll(theirs, 1, dims=-1), atol=1e-3)  # a shift would be caught


def test_device_augment_is_a_function_of_the_generator_seed():
    images = torch.from_numpy(load_fashion_mnist(FASHION_MNIST_ROOT, "test")[0][:8].copy())[:, None]
    augment = DeviceAugment((20, 20), (0.2, 1.0), (3 / 4, 4 / 3), True, (0.2860,), (0.3530,))
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert a.shape == (8, 1, 20, 20) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -0.2860 / 0.3530 - 1e-5 and a.max() <= (1 - 0.2860) / 0.3530 + 1e-5
    with pytest.raises(ValueError, match="uint8"):
        augment(images.float(), torch.Generator())


def test_processes_crop_their_rows_of_the_global_batch():
    """Two processes, each with half of a global batch and the same generator seed, produce exactly what one
    process produces for the whole batch (as masks do): torchrun changes nothing about augmentation."""
    images = torch.from_numpy(load_fashion_mnist(FASHION_MNIST_ROOT, "test")[0][:8].copy())[:, None]
    augment = DeviceAugment((20, 20), (0.2, 1.0), (3 / 4, 4 / 3), True, (0.2860,), (0.3530,))
    whole = augment(images, torch.Generator().manual_seed(5))
    halves = [augment(images[i:i + 4], torch.Generator().manual_seed(5), rows=(i, 8)) for i in (0, 4)]
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="does not fit"):
        augment(images[:4], torch.Generator(), rows=(6, 8))


# --- through the engine ------------------------------------------------------------------------------


def run(out, packed, *extra, resume=False):
    trainer = Pretrainer(prepare(PACKED, tiny(out, f"data.train.options.path={packed}", *extra)), resume=resume)
    trainer.train()
    return trainer


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "quickstart_packed" / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_runs_on_packed_data_with_device_augmentation(tmp_path, packed_fmnist, monkeypatch):
    seen = []
    real = Pretrainer._next
    monkeypatch.setattr(Pretrainer, "_next", lambda self, batches, micro: seen.append(real(self, batches, micro)[0])
                        or (seen[-1], None))
    trainer = run(tmp_path, packed_fmnist)
    assert trainer.step == 8 and all(math.isfinite(x) for x in losses(tmp_path))
    assert len(seen) == 8 and all(b.dtype == torch.float32 and b.shape == (16, 1, 28, 28) for b in seen)
    assert (tmp_path / "quickstart_packed" / "reconstructions" / "epoch0002.png").is_file()
    raw = torch.from_numpy(load_fashion_mnist(FASHION_MNIST_ROOT, "train")[0][:64].copy()).float()
    normalised = (raw / 255 - 0.2860) / 0.3530
    assert not any(torch.equal(seen[0][0, 0], image) for image in normalised)  # cropped, not as stored


def test_resume_on_packed_data_is_exact(tmp_path, packed_fmnist, monkeypatch):
    seeds = []  # the augmentation generator's seed of every micro-batch
    real = DeviceAugment.__call__
    def recording(self, batch, generator, rows=None):
        seeds.append(generator.initial_seed())
        return real(self, batch, generator, rows)

    monkeypatch.setattr(DeviceAugment, "__call__", recording)
    extra = ["data.num_workers=1", "optim.accum_steps=2", "data.batch_size=8"]
    straight = run(tmp_path / "a", packed_fmnist, *extra)
    straight_seeds, seeds[:] = list(seeds), []
    run(tmp_path / "b", packed_fmnist, *extra, "runtime.max_steps=4")
    resumed = run(tmp_path / "b", packed_fmnist, *extra, resume=True)
    assert len(straight_seeds) == 16 and len(set(straight_seeds)) == 16  # every micro-batch draws afresh
    assert seeds == straight_seeds
    assert len(losses(tmp_path / "a")) == 8
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_downstream_training_refuses_a_device_augmented_dataset(tmp_path, packed_fmnist):
    packed = f"data.train={{name: packed, options: {{path: '{packed_fmnist}', mean: [0.286], std: [0.353]}}}}"
    for recipe in ("finetune_fmnist.yaml", "linprobe_fmnist.yaml"):
        prepared = prepare(RECIPES / recipe, [packed, "init.format=none", f"runtime.output_dir={tmp_path}"])
        with pytest.raises(RecipeError, match="data.train.*only pretraining"):
            run_task(prepared)  # before any training: the error names the field
