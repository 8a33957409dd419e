"""`maeframe reconstruct` on real image files: a Fashion-MNIST test image written as PNG and as JPEG, with a
2-step quickstart checkpoint and with the same weights converted to the reference MAE layout."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from maeframe import embed, load_embeddings, reconstruct
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import load_checkpoint, save_dcp
from maeframe.engine.distributed import World
from maeframe.engine.run import make_task
from maeframe.interop import maeframe_to_official
from maeframe.masker import Mask
from maeframe_plugins.image_data import load_fashion_mnist
from conftest import QUICKSTART, tiny

TWO_STEPS = ("data.train.options.limit=32", "optim.epochs=1", "optim.warmup_epochs=0", "runtime.visualize_samples=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, its Pretrainer, folder with shirt.png / boot.jpg from the Fashion-MNIST test split)."""
    root = tmp_path_factory.mktemp("reconstruct")
    trainer = make_task(prepare(QUICKSTART, tiny(root / "runs", *TWO_STEPS)))
    trainer.train()
    images, _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    Image.fromarray(images[0]).save(root / "boot.png")
    Image.fromarray(images[1]).convert("RGB").save(root / "pullover.jpg", quality=95)
    return root / "runs" / "quickstart" / "last.pt", trainer, root


def test_reconstruct_writes_panels_and_the_training_loss_of_the_same_mask(trained, tmp_path):
    checkpoint, trainer, root = trained
    inputs = [root / "boot.png", root / "pullover.jpg"]
    assert main(["reconstruct", str(checkpoint), *map(str, inputs), "--out", str(tmp_path), "--seed", "3",
                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "reconstruct.json").read_text())
    assert report["reader"] == "fashion_mnist" and report["format"] == "maeframe"
    results = reconstruct(checkpoint, inputs, seed=3)
    for record, result in zip(report["inputs"], results):
        assert record["mask_ratio"] == pytest.approx(37 / 49) and record["hidden_tokens"] == 37
        picture = Image.open(record["files"][0])
        picture.load()
        assert picture.size[0] > 4 * 28
        # the training step's own loss on the same normalised input under the same mask
        mask = Mask.from_bool(result.masked[None] > 0)
        with torch.no_grad():
            total, terms, *_ = trainer.forward_losses(result.sample[None], mask)
        assert record["loss"] == pytest.approx(float(total), abs=1e-6)
        assert record["loss_terms"]["mse"] == pytest.approx(float(terms["mse"]), abs=1e-6)
    assert report["inputs"][0]["loss"] != report["inputs"][1]["loss"]


def test_mask_file_reproduces_a_drawn_mask_exactly(trained, tmp_path):
    checkpoint, _, root = trained
    drawn = reconstruct(checkpoint, [root / "boot.png"], seed=5)[0]
    np.savetxt(tmp_path / "mask.txt", drawn.masked.numpy().reshape(7, 7), fmt="%d")
    assert main(["reconstruct", str(checkpoint), str(root / "boot.png"), "--out", str(tmp_path / "out"),
                 "--mask-file", str(tmp_path / "mask.txt")]) == 0
    again = reconstruct(checkpoint, [root / "boot.png"], mask_file=tmp_path / "mask.txt")[0]
    assert torch.equal(again.masked, drawn.masked) and torch.equal(again.prediction, drawn.prediction)
    report = json.loads((tmp_path / "out" / "reconstruct.json").read_text())
    assert report["inputs"][0]["loss"] == drawn.loss and report["mask_file"] == str(tmp_path / "mask.txt")
    other = reconstruct(checkpoint, [root / "boot.png"], masker="block", masker_options={"ratio": 0.5})[0]
    assert other.mask_ratio == pytest.approx(0.5, abs=0.05)


def test_official_layout_weights_reconstruct_like_the_checkpoint(trained, tmp_path, capsys):
    checkpoint, trainer, root = trained
    state = load_checkpoint(checkpoint)
    official = tmp_path / "mae_tiny.pth"
    torch.save({"model": maeframe_to_official(state["model"], trainer.components.tokenizer.spec)}, official)
    # heads are not in the tensors; the reference normalises with ImageNet statistics unless told otherwise
    sets = ["model.num_heads=2", "model.decoder_num_heads=2", "data.train.options.mean=[0.286]",
            "data.train.options.std=[0.353]"]
    args = [arg for item in sets for arg in ("--set", item)]
    assert main(["reconstruct", str(official), str(root / "boot.png"), "--out", str(tmp_path / "o"), *args]) == 0
    report = json.loads((tmp_path / "o" / "reconstruct.json").read_text())
    assert report["format"] == "official_mae" and report["reader"] == "image_files"
    ours = reconstruct(checkpoint, [root / "boot.png"], overrides=["data.train.options.mean=[0.286]",
                                                                   "data.train.options.std=[0.353]"])[0]
    assert report["inputs"][0]["loss"] == pytest.approx(ours.loss, abs=1e-5)
    # and they embed as the checkpoint does (a .txt list of the two files)
    (tmp_path / "two.txt").write_text(f"{root / 'boot.png'}\n{root / 'pullover.jpg'}\n")
    theirs, _, _ = load_embeddings(embed(official, tmp_path / "two.txt", tmp_path / "o.safetensors", overrides=sets,
                                         device="cpu", progress=False))
    ours, _, paths = load_embeddings(embed(checkpoint, tmp_path / "two.txt", tmp_path / "m.safetensors",
                                           device="cpu", progress=False))
    assert paths == [str(root / "boot.png"), str(root / "pullover.jpg")]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # weights whose tensors do not fit the model asked for: an error naming the file and the shapes
    assert main(["reconstruct", str(official), str(root / "boot.png"), "--out", str(tmp_path / "p"),
                 *args, "--set", "model.mlp_ratio=2.0"]) == 2
    err = capsys.readouterr().err
    assert f"error: {official}: the weights do not fit the model" in err and "blocks.0.mlp.fc1.weight" in err


def test_bad_inputs_are_errors_naming_the_file(trained, tmp_path, capsys):
    checkpoint, _, root = trained
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    fake = tmp_path / "fake.png"
    fake.write_text("not a png either")
    np.save(tmp_path / "short.npy", np.ones(10))
    cases = [
        ([str(notes)], [], "notes.txt: not a file these weights read"),
        ([str(tmp_path / "absent.png")], [], "absent.png"),
        ([str(fake)], [], "fake.png: cannot be read"),
        ([str(root / "boot.png")], ["--mask-file", str(tmp_path / "short.npy")],
         "short.npy: holds 10 values; the token grid (7, 7) has 49 tokens"),
        ([str(root / "boot.png")], ["--set", "model.embed_dim=64"], "model.embed_dim: the checkpoint's encoder has 32"),
        ([str(root / "boot.png")], ["--set", "model.decoder_depth=2"], "missing ['decoder.blocks.1"),
    ]
    for inputs, extra, message in cases:
        assert main(["reconstruct", str(checkpoint), *inputs, "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (message, err)
        assert "Traceback" not in err
    assert main(["reconstruct", str(notes), str(root / "boot.png"), "--out", str(tmp_path / "x")]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_a_sharded_dcp_checkpoint_reconstructs_like_its_file(trained, tmp_path):
    """An fsdp run's last.dcp/ (written here by the engine's own save_dcp from the file's state) is read whole."""
    checkpoint, _, root = trained
    state = load_checkpoint(checkpoint)
    tensors = {key: state.pop(key) for key in ("model", "optimizer")}
    save_dcp(tmp_path / "last.dcp", tensors, {k: v for k, v in state.items() if k != "format"}, World())
    from_dcp = reconstruct(tmp_path / "last.dcp", [root / "boot.png"], seed=2)[0]
    from_file = reconstruct(checkpoint, [root / "boot.png"], seed=2)[0]
    assert from_dcp.loss == from_file.loss and torch.equal(from_dcp.prediction, from_file.prediction)
