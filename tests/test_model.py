import math

import numpy as np
import pytest
import torch

from maeframe import Mask, TokenSpec
from maeframe.model import MaskedAutoencoder, sincos_pos_embed
from maeframe.recipe import ModelConfig

SPEC = TokenSpec(grid=(4, 4), patch_size=(4, 4), channels=3)
CONFIG = ModelConfig(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def reference_2d(h: int, w: int, dim: int) -> np.ndarray:
    """The MAE reference layout, written independently: tokens row-major over (h, w); the first half of
    the width encodes the column (w), the second the row (h); each half is [sin, cos]."""
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def test_2d_sincos_matches_the_mae_reference_layout():
    assert np.allclose(sincos_pos_embed((7, 5), 64).numpy(), reference_2d(7, 5, 64), atol=1e-6)
    assert np.allclose(sincos_pos_embed((14, 14), 768).numpy(), reference_2d(14, 14, 768), atol=1e-6)


def test_3d_sincos_splits_width_across_axes():
    embed = sincos_pos_embed((2, 3, 4), 48)
    assert embed.shape == (24, 48)
    assert torch.unique(embed, dim=0).shape[0] == 24
    with pytest.raises(ValueError, match="not divisible"):
        sincos_pos_embed((2, 3, 4), 50)


def test_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    model = MaskedAutoencoder(SPEC, SPEC.patch_dim, CONFIG).eval()
    patches = torch.randn(2, 16, SPEC.patch_dim)
    mask = Mask.from_noise(torch.rand(2, 16), 4)
    prediction = model(patches, mask)
    assert prediction.latent.shape == (2, 1 + 4, 32)
    assert prediction.values.shape == (2, 16, SPEC.patch_dim)
    changed = patches.clone()
    changed[mask.masked.bool()] = 1e3  # hidden content must not reach the encoder
    assert torch.equal(model(changed, mask).latent, prediction.latent)


def test_visible_order_does_not_change_the_output():
    torch.manual_seed(0)
    model = MaskedAutoencoder(SPEC, SPEC.patch_dim, CONFIG).eval()
    patches = torch.randn(1, 16, SPEC.patch_dim)
    hidden = torch.rand(1, 16).argsort(1) < 12
    reordered = Mask.from_noise(torch.where(hidden, 2.0, torch.rand(1, 16)), 4)
    assert torch.equal(reordered.masked.bool(), hidden)
    out_a = model(patches, Mask.from_bool(hidden)).values
    out_b = model(patches, reordered).values
    assert torch.allclose(out_a, out_b, atol=1e-5)


def test_mae_initialisation():
    torch.manual_seed(0)
    model = MaskedAutoencoder(SPEC, SPEC.patch_dim, CONFIG)
    weight = model.encoder.patch_embed.weight
    bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))  # xavier-uniform on [D, patch_dim]
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert torch.all(model.encoder.patch_embed.bias == 0)
    assert abs(model.encoder.cls_token.std().item() - 0.02) < 0.01
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert not any("pos_embed" in name for name in model.state_dict())  # fixed, recomputed from the grid


def test_local_decoder_attention_from_the_recipe():
    from maeframe.model.windowed import WindowedBlock

    spec = TokenSpec(grid=(8, 4), patch_size=(4, 4), channels=1)
    config = CONFIG.model_copy(update={"decoder_attention": "local", "decoder_window": (4, 2), "decoder_depth": 2})
    model = MaskedAutoencoder(spec, spec.patch_dim, config)
    assert all(isinstance(block, WindowedBlock) for block in model.decoder.blocks)
    assert [block.attn.shift for block in model.decoder.blocks] == [(0, 0), (2, 1)]
    out = model(torch.randn(2, 32, 16), Mask.from_noise(torch.rand(2, 32), 8))
    assert out.values.shape == (2, 32, 16)


def test_local_window_must_fit_the_grid():
    from maeframe.build import prepare
    from maeframe.errors import RecipeError
    from conftest import QUICKSTART

    with pytest.raises(RecipeError) as err:
        prepare(QUICKSTART, ["model.decoder_attention=local", "model.decoder_window=[3, 3]"])
    assert err.value.problems[0][0] == "model.decoder_window"


def saved_bytes_and_grads(config: ModelConfig, seed: int = 0):
    """Bytes autograd keeps for the backward during one forward, and the gradients after it."""
    torch.manual_seed(seed)
    model = MaskedAutoencoder(SPEC, 48, config)
    patches = torch.randn(3, 16, 48)
    mask = Mask.from_noise(torch.rand(3, 16), 4)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # drop path draws here
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(patches, mask).values.square().mean()
    loss.backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["global", "local"])
def test_activation_checkpointing_keeps_less_and_computes_the_same_gradients(attention):
    base = CONFIG.model_copy(update={"depth": 4, "decoder_depth": 2, "drop_path": 0.2,
                                     "decoder_attention": attention, "decoder_window": (2, 2)})
    plain_bytes, plain = saved_bytes_and_grads(base)
    ckpt_bytes, ckpt = saved_bytes_and_grads(base.model_copy(update={"activation_checkpointing": True}))
    assert ckpt_bytes < plain_bytes / 2
    for name, grad in plain.items():  # same drop-path draws in the recomputation, same numbers
        assert torch.allclose(grad, ckpt[name], atol=1e-6, rtol=1e-5), name
