import math

import torch

from maeframe import TokenSpec
from maeframe.engine.optim import build_optimizer, build_schedule, peak_lr
from maeframe.model import MaskedAutoencoder
from maeframe.recipe import ModelConfig, OptimConfig

SPEC = TokenSpec(grid=(2, 2), patch_size=(4, 4), channels=1)


def make_optimizer(**optim):
    model = MaskedAutoencoder(SPEC, 16, ModelConfig(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                                                    decoder_depth=1, decoder_num_heads=2))
    config = OptimConfig(epochs=10, **optim)
    return model, config, build_optimizer(model, config, 1e-3, torch.device("cpu"))


def test_no_weight_decay_on_norms_biases_and_tokens():
    model, _, optimizer = make_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "encoder.cls_token" in plain and "decoder.mask_token" in plain
    assert all(n.endswith(".bias") or ".norm" in n or "token" in n for n in plain)
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_lr_scaling_rule():
    assert peak_lr(OptimConfig(epochs=1, base_lr=1.5e-4), 4096) == 1.5e-4 * 16
    assert peak_lr(OptimConfig(epochs=1, lr=3e-3), 4096) == 3e-3


def test_per_iteration_warmup_then_cosine_matches_the_paper_formula():
    _, config, optimizer = make_optimizer(warmup_epochs=2, min_lr=1e-5)
    steps_per_epoch = 7
    schedule = build_schedule(optimizer, config, steps_per_epoch)
    peak, total, warmup = 1e-3, 70, 14
    for step in [0, 1, 7, 13, 14, 20, 42, 69]:
        schedule.step_update(step)
        epoch = step / steps_per_epoch
        if epoch < 2:
            expected = peak * epoch / 2
        else:
            expected = 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert math.isclose(optimizer.param_groups[0]["lr"], expected, rel_tol=1e-9, abs_tol=1e-12), step
