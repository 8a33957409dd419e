"""bf16 autocast, fused AdamW's device-side skip of a non-finite step, and torch.compile without graph
breaks, on the CPU and, where one is present, on a CUDA GPU (there bf16 is the default precision)."""
import json

import pytest
import torch

from maeframe.build import prepare
from maeframe.engine.pretrain import Pretrainer
from maeframe.engine.runtime import compile_static
from conftest import QUICKSTART, tiny

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def on(device: str) -> list[str]:
    return [f"runtime.device={device}", "runtime.precision=bf16"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_bf16_run_learns_with_fp32_master_weights(tmp_path, device):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *on(device), "optim.epochs=6", "optim.base_lr=5e-3")))
    with trainer.train_step.runtime.autocast():
        assert trainer.model.encoder.blocks[0].attn.qkv(torch.ones(1, 32, device=device)).dtype == torch.bfloat16
    trainer.train()
    losses = [line["loss"] for line in metrics(tmp_path / "quickstart")]
    assert all(loss is not None for loss in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_bf16_prediction_is_close_to_fp32(tmp_path, device):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *on(device))))
    batch = next(iter(trainer.loader))[0].to(device)
    mask = trainer.train_step.draw_mask(batch.shape[0])
    with torch.no_grad():
        _, _, low = trainer.predict(batch, mask)
        full = trainer.model(trainer.components.tokenizer.tokenize(batch).patches, mask).values
    assert low.values.dtype == torch.bfloat16
    assert torch.allclose(low.values.float(), full, atol=0.05, rtol=0.05)


def test_fused_adamw_skips_a_non_finite_step_without_a_host_sync(nan_recipe, device):
    trainer = Pretrainer(nan_recipe(*on(device), "runtime.nonfinite=skip", "runtime.max_steps=3"))
    trainer.train()
    assert trainer.optimizer.defaults["fused"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(3, [next(iter(trainer.loader))[:2]])  # the NaN step
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert int(trainer.train_step.nonfinite) == 1 and int(trainer.train_step.first_nonfinite) == 3


def test_the_model_compiles_without_graph_breaks(tmp_path, device):
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *on(device))))
    batch = next(iter(trainer.loader))[0].to(device)
    mask = trainer.train_step.draw_mask(batch.shape[0])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(trainer.model)(trainer.components.tokenizer.tokenize(batch).patches, mask)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_compiled_run_matches_eager(tmp_path, device):
    for name, extra in (("eager", []), ("compiled", ["runtime.compile=true"])):  # one after the other:
        overrides = tiny(tmp_path / name, f"runtime.device={device}", "runtime.precision=fp32", *extra)
        Pretrainer(prepare(QUICKSTART, overrides)).train()  # each run seeds the RNG that draws its masks
    a, b = (metrics(tmp_path / name / "quickstart") for name in ("eager", "compiled"))
    assert [line["loss"] for line in b] == pytest.approx([line["loss"] for line in a], rel=1e-3)


def test_compiled_modules_keep_static_shapes():
    """Each new token count (a curriculum's mask ratio, a last partial batch) compiles a static graph, not a
    dynamic-shape one (torch 2.11's dynamic-shape kernels for the MAE step failed on an H100), also beyond
    torch's default limit of 8 graphs, after which it would run eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = compile_static(torch.nn.Linear(8, 8), backend="eager")  # dynamo decides the shapes, not the backend
    for tokens in [*range(10, 22), 12]:
        layer(torch.randn(2, tokens, 8))
    assert counters["stats"]["unique_graphs"] == 12  # torch's defaults: 2 (automatic dynamic shapes)
