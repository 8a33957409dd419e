"""Pretraining from data as users have it — an unlabelled nested folder, a CSV list, 4-channel .npy arrays
and WebDataset tar shards behind a file:// URL — with exact resume and unreadable files counted."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.pretrain import Pretrainer
from maeframe_plugins.image_data import FASHION_MNIST_ROOT, load_fashion_mnist
from conftest import QUICKSTART, tiny

BROKEN = b"\x89PNG\r\n\x1a\n not really a png"


def fmnist(count=64):
    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    return images[:count], labels[:count]


def write_nested(root, count=64):
    """Real Fashion-MNIST images as PNG / JPEG / BMP at three depths, no class folders, one broken PNG."""
    images, _ = fmnist(count)
    for i, image in enumerate(images):
        folder = root / f"site{i % 2}" / ("2024/05" if i % 3 == 0 else "") / ("scans" if i % 4 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:03d}.{['png', 'jpg', 'bmp'][i % 3]}")
    (root / "site0" / "broken.png").write_bytes(BROKEN)
    (root / "README.txt").write_text("not an image")
    return root


def write_csv_list(root, count=64):
    """images/<n>.png listed in data/train.csv as path,label (class names; one row unlabelled), paths relative
    to the list, plus a listed file that does not exist."""
    images, labels = fmnist(count)
    (root / "images").mkdir(parents=True)
    (root / "data").mkdir()
    rows = ["path,label"]
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        rows.append(f"../images/{i}.png,{'' if i == 5 else f'class{labels[i]}'}")
    rows.append("../images/missing.png,class0")
    (root / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "data" / "train.csv"


def four_bands(image):
    """A real grey image as 4 uint8 bands: itself, inverted, mirrored and transposed."""
    return np.stack([image, 255 - image, image[:, ::-1], image.T])


def write_npy_bands(root, count=64):
    """4-band uint8 arrays, [C, H, W] and [H, W, C] alternately, in sub-folders; one truncated .npy."""
    images, _ = fmnist(count)
    for i, image in enumerate(images):
        bands = four_bands(image)
        (root / f"tile{i % 4}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"tile{i % 4}" / f"{i:03d}.npy", bands if i % 2 else bands.transpose(1, 2, 0).copy())
    (root / "tile0" / "cut.npy").write_bytes((root / "tile0" / "000.npy").read_bytes()[:90])
    return root


def write_shards(root, count=64, per_shard=20):
    """WebDataset shards written by webdataset's own TarWriter: KEY.png + KEY.cls, one member not an image."""
    import webdataset

    images, labels = fmnist(count)
    root.mkdir(parents=True)
    for s in range(0, count, per_shard):
        with webdataset.TarWriter(str(root / f"train-{s // per_shard:04d}.tar")) as sink:
            for i in range(s, min(s + per_shard, count)):
                png = __import__("io").BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                sink.write({"__key__": f"s{i:05d}", "png": png.getvalue() if i != 7 else BROKEN,
                            "cls": int(labels[i])})
    return f"file://{root}/train-{{0000..{(count - 1) // per_shard:04d}}}.tar"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("user-data")
    return {
        "nested": [f"data.train={{name: image_files, options: {{root: '{write_nested(base / 'nested')}', "
                   f"mean: [0.286], std: [0.353]}}}}"],
        "csv": [f"data.train={{name: image_list, options: {{list: '{write_csv_list(base / 'csv')}', "
                f"label_column: label, mean: [0.286], std: [0.353]}}}}"],
        "npy4": [f"data.train={{name: image_files, options: {{root: '{write_npy_bands(base / 'npy')}', "
                 f"mean: [0.3, 0.7, 0.3, 0.3], std: [0.35, 0.35, 0.35, 0.35]}}}}", "tokenizer.options.channels=4",
                 "tokenizer.options.display_channels=[0, 1, 3]"],
        "tar": [f"data.train={{name: tar_shards, options: {{urls: '{write_shards(base / 'shards')}', "
                f"mean: [0.286], std: [0.353]}}}}"],
    }


def train(out, overrides, *extra, resume=False):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(out, *overrides, "data.max_bad_fraction=0.2", *extra)),
                         resume=resume)
    trainer.train()
    return trainer


def metrics(out):
    return [json.loads(line) for line in (out / "quickstart" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", ["nested", "csv", "npy4", "tar"])
def test_resume_is_exact_and_unreadable_files_are_counted(tmp_path, sources, source, caplog):
    """Straight in this process (its warnings are captured); stopped after 4 of 8 steps and resumed with a
    loader process: the same losses, weights and bad-read count."""
    with caplog.at_level("WARNING", logger="maeframe.data"):
        straight = train(tmp_path / "a", sources[source])
    train(tmp_path / "b", sources[source], "runtime.max_steps=4", "data.num_workers=1")
    resumed = train(tmp_path / "b", sources[source], "data.num_workers=1", resume=True)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit for bit
    assert a[-1]["bad_samples"] == b[-1]["bad_samples"] >= 2  # the bad file, read in each of 2 epochs
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    bad = {"nested": "broken.png", "csv": "missing.png", "npy4": "cut.npy", "tar": "train-0000.tar:s00007.png"}
    assert "skipping unreadable sample" in caplog.text and bad[source] in caplog.text
    assert (tmp_path / "a" / "quickstart" / "reconstructions" / "epoch0002.png").is_file()


def test_four_band_pictures_and_export(tmp_path, sources):
    """Pictures draw the display_channels as RGB; the encoder exports for timm with in_chans=4."""
    train(tmp_path, sources["npy4"], "optim.epochs=1")
    picture = Image.open(tmp_path / "quickstart" / "reconstructions" / "epoch0001.png")
    assert picture.mode == "RGB"
    assert main(["export", str(tmp_path / "quickstart" / "last.pt"), str(tmp_path / "enc.safetensors"),
                 "--timm-name", "vit_tiny_patch16_224"]) == 0
    from safetensors.torch import load_file

    assert load_file(tmp_path / "enc.safetensors")["patch_embed.proj.weight"].shape[1] == 4


def launch(out, processes, overrides):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "maeframe"] if processes > 1 else [sys.executable, "-m", "maeframe"]
    result = subprocess.run([*command, "run", str(QUICKSTART), *tiny(out, f"data.batch_size={16 // processes}"),
                             *overrides, "data.max_bad_fraction=0.2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(out)


def test_two_processes_on_tar_shards_follow_one_process(tmp_path, sources):
    """Rank r loads its slice of each global batch of the (seed, epoch) permutation: 2 processes read the
    shards' samples exactly as one process with the same global batch (same losses, same bad reads)."""
    one, two = launch(tmp_path / "one", 1, sources["tar"]), launch(tmp_path / "two", 2, sources["tar"])
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, 9))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    assert one[-1]["bad_samples"] == two[-1]["bad_samples"] >= 2
