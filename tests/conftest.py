"""Shared helpers: a tiny version of the quickstart recipe on real Fashion-MNIST."""
from __future__ import annotations

from pathlib import Path

import pytest

from maeframe.build import prepare

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

TINY = [
    "data.train.options.limit=64", "data.batch_size=16", "data.num_workers=0", "optim.epochs=2",
    "optim.warmup_epochs=1", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
    "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "runtime.progress_bar=false", "runtime.tensorboard=false", "runtime.log_interval=1",
    "monitor=null",  # the quickstart's k-NN monitor adds metrics lines; tests/test_monitor.py turns it on
]


def tiny(output_dir: Path, *extra: str) -> list[str]:
    """Overrides that shrink the quickstart to a 64-image, 2-epoch run (4 steps/epoch) in output_dir."""
    return [*TINY, f"runtime.output_dir={output_dir}", *extra]


@pytest.fixture(autouse=True, scope="session")
def _needs_fashion_mnist():
    if not FASHION_MNIST.is_file():
        pytest.exit("real Fashion-MNIST is missing: run `make data` (apt-get install dataset-fashion-mnist)", 2)


NAN_PLUGIN = """
import torch
from maeframe import Loss, hookimpl

class NanAtStep(Loss):
    '''0 normally, NaN at step 3 (a stand-in for an fp overflow).'''
    step = 0
    def set_progress(self, step, epoch):
        self.step = step
    def __call__(self, prediction, target, mask):
        zero = prediction.values.float().sum() * 0
        return zero + (float('nan') if self.step == 3 else 0.0)

@hookimpl
def register_losses(register):
    register("nan_at_3", NanAtStep)
"""


@pytest.fixture
def nan_recipe(tmp_path, monkeypatch):
    (tmp_path / "nan_plugin.py").write_text(NAN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return lambda *extra: prepare(QUICKSTART, tiny(tmp_path / "out", "plugins=[nan_plugin]",
                                                   "losses=[{name: mse}, {name: nan_at_3}]", *extra))
