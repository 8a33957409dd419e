"""`maeframe embed`: the k-NN task's features of a recipe's data, a CSV list of PNG files, resuming by chunk,
refusing leftover chunks of another run, and 2 torchrun processes (gloo) writing what one process writes."""
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import maeframe.engine.embed as embed_module
from maeframe import embed, load_embeddings
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.knn_eval import KnnTask
from maeframe.engine.run import make_task
from maeframe.errors import MaeframeError
from maeframe_plugins.image_data import FashionMNISTDataset, FashionMNISTOptions, load_fashion_mnist
from conftest import QUICKSTART, RECIPES, tiny

ROWS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, a data recipe: 40 Fashion-MNIST test images, a knn recipe tree on the same data)."""
    root = tmp_path_factory.mktemp("embed")
    make_task(prepare(QUICKSTART, tiny(root / "runs", "data.train.options.limit=32", "optim.epochs=1",
                                       "optim.warmup_epochs=0"))).train()
    checkpoint = root / "runs" / "quickstart" / "last.pt"
    recipe = load_checkpoint(checkpoint)["recipe"]
    data = {"name": "fashion_mnist", "options": {"split": "test", "limit": ROWS}}
    (root / "data.yaml").write_text(yaml.safe_dump({"data": {"train": data}}))
    knn = {"task": "knn", "name": "knn", "init": {"format": "maeframe", "checkpoint": str(checkpoint)},
           "tokenizer": recipe["tokenizer"], "model": {k: recipe["model"][k] for k in ("embed_dim", "depth", "num_heads")},
           "data": {"train": data, "eval": data, "batch_size": 16, "num_workers": 0},
           "runtime": {"device": "cpu", "output_dir": str(root / "knn")}}
    return checkpoint, root / "data.yaml", knn


def test_features_are_the_knn_tasks_with_labels_and_sources(setup, tmp_path):
    checkpoint, data, knn = setup
    (bank, labels), _ = KnnTask(prepare(_write(tmp_path / "knn.yaml", knn))).features()
    assert main(["embed", str(checkpoint), str(data), "--out", str(tmp_path / "e.safetensors"), "--batch-size", "16",
                 "--chunk-size", "15", "--device", "cpu"]) == 0
    features, got_labels, paths = load_embeddings(tmp_path / "e.safetensors")
    torch.testing.assert_close(features, bank, atol=1e-6, rtol=0)
    assert torch.equal(got_labels, labels) and paths == [f"sample {i}" for i in range(ROWS)]
    assert not (tmp_path / "e.safetensors.parts").exists()
    every = embed(checkpoint, data, tmp_path / "all.safetensors", pool="all", device="cpu", progress=False)
    tokens, _, _ = load_embeddings(every)
    assert tokens.shape == (ROWS, 1 + 49, 32)
    torch.testing.assert_close(tokens[:, 1:].mean(1), bank, atol=1e-5, rtol=0)


def test_csv_list_of_image_files_round_trips_labels_and_paths(setup, tmp_path):
    checkpoint, _, _ = setup
    images, classes = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    rows = ["path,label"]
    for i in range(6):
        Image.fromarray(images[i]).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{classes[i]}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = embed(checkpoint, tmp_path / "list.csv", tmp_path / "list.safetensors", device="cpu", progress=False)
    features, labels, paths = load_embeddings(out)
    assert features.shape == (6, 32) and labels.tolist() == [int(c) for c in classes[:6]]
    assert paths == [str(tmp_path / f"img{i}.png") for i in range(6)]
    folder = embed(checkpoint, tmp_path, tmp_path / "folder.safetensors", device="cpu", progress=False)
    from_folder, none, _ = load_embeddings(folder)  # a folder of unlabelled images: no labels stored
    assert none is None and torch.equal(from_folder, features)


def test_resume_skips_finished_chunks_and_refuses_another_runs_parts(setup, tmp_path, monkeypatch):
    checkpoint, data, _ = setup
    whole = embed(checkpoint, data, tmp_path / "whole.safetensors", chunk_size=10, device="cpu", progress=False)
    out = tmp_path / "resumed.safetensors"
    written = []
    real_write = embed_module.write_chunk

    def crash_after_two(out_, index, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(index)
        real_write(out_, index, *args)

    monkeypatch.setattr(embed_module, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        embed(checkpoint, data, out, chunk_size=10, device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed.safetensors.parts").iterdir()) == \
        ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    with pytest.raises(MaeframeError, match="chunk-00000.safetensors was written for other weights, data, pool"):
        embed(checkpoint, data, out, chunk_size=10, pool="cls", device="cpu", progress=False)
    written.clear()
    monkeypatch.setattr(embed_module, "write_chunk", lambda out_, index, *args: (written.append(index),
                                                                                  real_write(out_, index, *args)))
    embed(checkpoint, data, out, chunk_size=10, device="cpu", progress=False)
    assert written == [2, 3]  # the two finished chunks were not recomputed
    assert_same_file(out, whole)


def test_two_torchrun_processes_write_what_one_writes(setup, tmp_path):
    checkpoint, data, _ = setup
    one = embed(checkpoint, data, tmp_path / "one.safetensors", chunk_size=7, device="cpu", progress=False)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maeframe"]
    result = subprocess.run([*launcher, "embed", str(checkpoint), str(data), "--out", str(tmp_path / "two.safetensors"),
                             "--chunk-size", "7", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_file(tmp_path / "two.safetensors", one)


def assert_same_file(a, b):
    """Same tensors, bit for bit, and the same header metadata (whose key order safetensors does not fix)."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with safe_open(str(a), "pt") as x, safe_open(str(b), "pt") as y:
        assert x.metadata() == y.metadata()


def _write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_finetuned_checkpoint_gives_what_its_head_sees(setup, tmp_path):
    checkpoint, data, _ = setup
    overrides = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.train.options.limit=32",
                 "data.eval.options.limit=16", "data.batch_size=16", "data.num_workers=0", "optim.epochs=1",
                 "optim.warmup_epochs=0", "runtime.progress_bar=false", "runtime.tensorboard=false",
                 f"runtime.output_dir={tmp_path}", f"init.checkpoint={checkpoint}"]
    trainer = make_task(prepare(RECIPES / "finetune_fmnist.yaml", overrides))
    trainer.train()
    out = embed(tmp_path / "finetune_fmnist" / "last.pt", data, tmp_path / "ft.safetensors", device="cpu",
                progress=False)
    features, labels, _ = load_embeddings(out)
    dataset = FashionMNISTDataset(FashionMNISTOptions(split="test", limit=ROWS), (1, 28, 28), False)
    batch = torch.stack([dataset[i][0] for i in range(ROWS)])
    with torch.no_grad():
        expected = trainer.model.eval().forward_features(trainer.tokenizer.tokenize(batch).patches)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    with pytest.raises(MaeframeError, match="head.pool avg"):
        embed(tmp_path / "finetune_fmnist" / "last.pt", data, tmp_path / "x.safetensors", pool="cls", device="cpu")
