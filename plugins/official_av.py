"""Reference VideoMAE and AudioMAE weights -> maeframe encoder weights (fine-tuning, linear probing).

VideoMAE (MCG-NJU/VideoMAE `modeling_pretrain.py` / `modeling_finetune.py`), D width, C channels,
t×p×q tubelets:
    patch_embed.proj.weight [D, C, t, p, q] (a Conv3d with stride = kernel), patch_embed.proj.bias [D]
    blocks.{i}.norm1, blocks.{i}.attn.qkv.weight [3D, D] (no bias), blocks.{i}.attn.q_bias [D],
    blocks.{i}.attn.v_bias [D], blocks.{i}.attn.proj, blocks.{i}.norm2, blocks.{i}.mlp.fc1 / fc2
    norm (pretraining) or fc_norm + head (fine-tuned; dropped here)
Pretraining checkpoints prefix these with `encoder.` and add `encoder_to_decoder`, `mask_token` and
`decoder.*` (dropped). VideoMAE has no cls token and adds a fixed 1-D sinusoid table over the token
index (`videomae_positions`), not stored in the checkpoint; tokens are numbered (time, row, column) as
maeframe's `video_tube` grid. The converted encoder therefore runs with layout "videomae" (no cls token,
that table instead of the 3-D sin-cos), see `maeframe.model.classifier.Classifier`.

AudioMAE (facebookresearch/AudioMAE `models_mae.py` / `models_vit.py`) keeps the image MAE layout:
`patch_embed.proj.weight` [D, 1, pt, pf] is a Conv2d over the [1, T, F] fbank (time as height), and
`pos_embed` [1, 1 + (T/pt)·(F/pf), D] is the MAE 2-D sin-cos of the (time, frequency) grid with a zero
cls row -- the `spectrogram` tokenizer's grid and maeframe's sin-cos, so `official_to_maeframe` converts
it once the decoder and the classifier are dropped. For reconstruction the decoder converts too
(`audiomae_autoencoder_to_maeframe`): its `decoder_mode=1` blocks are Swin V2 blocks in shifted 4×4 windows,
maeframe's `decoder_window_block: swin_v2`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maeframe import flat_sincos_pos_embed
from maeframe.interop import InteropError, official_to_maeframe

VIDEOMAE_DROPPED = ("encoder_to_decoder.", "mask_token", "decoder.", "head.", "fc_norm.", "fc_dropout.")
AUDIOMAE_DROPPED = ("decoder_", "mask_token", "head.", "fc_norm.")


# VideoMAE's fixed position table [num_tokens, dim]: the core's sinusoid over the flattened token order
videomae_positions = flat_sincos_pos_embed


def unwrap_reference(state: Any) -> dict[str, Tensor]:
    """The state dict of a reference checkpoint: raw, or under 'model' / 'module' (VideoMAE saves both)."""
    for key in ("model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InteropError("expected a state dict of tensors (or {'model': ...} / {'module': ...})")
    return state


def videomae_to_maeframe(state_dict: Any, num_tokens: int | None = None) -> dict[str, Tensor]:
    """VideoMAE weights (pretraining or fine-tuned) -> maeframe `encoder.*` tensors for layout "videomae".

    The Conv3d kernel [D, C, t, p, q] becomes the Linear over flat (t, p, q, C) tubelets; q_bias and v_bias
    become the qkv bias [q_bias, 0, v_bias] (VideoMAE's key projection has no bias; without q/v biases
    the bias is zero, which is what such a model computes). A stored `pos_embed` must equal
    `videomae_positions` for `num_tokens` tokens. Layer-scale weights (gamma_1/gamma_2) are rejected."""
    state = unwrap_reference(state_dict)
    out: dict[str, Tensor] = {}
    biases: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        name = key.split(".", 1)[1] if key.startswith(("encoder.", "backbone.")) else key
        if key.startswith(VIDEOMAE_DROPPED) or name.startswith(("head.", "fc_norm.", "fc_dropout.")):
            continue
        if name == "pos_embed":
            _check_videomae_positions(value, num_tokens)
        elif name == "patch_embed.proj.weight":
            if value.dim() != 5:
                raise InteropError(f"{key} has shape {list(value.shape)}; VideoMAE's tubelet embedding is a "
                                   f"Conv3d weight [D, C, t, p, q]")
            out["encoder.patch_embed.weight"] = value.permute(0, 2, 3, 4, 1).reshape(value.shape[0], -1)
        elif name == "patch_embed.proj.bias":
            out["encoder.patch_embed.bias"] = value
        elif name.startswith("blocks.") and (".gamma_" in name or name.endswith((".ls1.gamma", ".ls2.gamma"))):
            raise InteropError(f"{key}: layer-scale weights (init_values > 0) have no counterpart in maeframe's "
                               f"blocks")
        elif name.startswith("blocks.") and name.endswith((".attn.q_bias", ".attn.v_bias")):
            block, _, kind = name.rpartition(".")
            biases.setdefault(block, {})[kind] = value
        elif name.startswith(("blocks.", "norm.")):
            out[f"encoder.{name}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"keys that are not part of a VideoMAE encoder: {', '.join(unknown[:8])}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    if "encoder.patch_embed.weight" not in out:
        raise InteropError("no patch_embed.proj.weight: not a VideoMAE checkpoint")
    merge_qv_biases(out, biases, "encoder.")
    return out


def merge_qv_biases(out: dict[str, Tensor], biases: dict[str, dict[str, Tensor]], prefix: str) -> None:
    """Give every `{prefix}blocks.{i}.attn.qkv.weight` in `out` the bias [q_bias, 0, v_bias] from `biases`
    ({"blocks.{i}.attn": {"q_bias": ..., "v_bias": ...}}; zero when the block has none)."""
    for key in [k for k in out if k.startswith(prefix) and k.endswith(".attn.qkv.weight")]:
        block = key[len(prefix):-len(".qkv.weight")]
        pair = biases.get(block, {})
        if len(pair) == 1:
            raise InteropError(f"{prefix}{block}: has {next(iter(pair))} without its partner (q_bias and v_bias go "
                               f"together)")
        width = out[key].shape[0] // 3
        q = pair.get("q_bias", out[key].new_zeros(width))
        v = pair.get("v_bias", out[key].new_zeros(width))
        out[f"{prefix}{block}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def videomae_decoder_to_maeframe(state_dict: Any, num_tokens: int | None = None) -> dict[str, Tensor]:
    """The decoder of a VideoMAE pretraining checkpoint -> maeframe `decoder.*` tensors for layout "videomae"
    ({} when the weights hold none, e.g. fine-tuned ones):
        encoder_to_decoder.weight [d, D] (no bias)  -> decoder.embed.weight, decoder.embed.bias = 0
        mask_token [1, 1, d]                        -> decoder.mask_token
        decoder.blocks.{i}.* (q_bias/v_bias merged as in the encoder), decoder.norm.*, decoder.head.*
    The decoder's positions are VideoMAE's sinusoid table at width d (a stored `pos_embed` of width d is
    checked against it); its head predicts each tubelet laid out (t, p, q, C), as the `video_tube` tokenizer."""
    state = unwrap_reference(state_dict)
    out: dict[str, Tensor] = {}
    biases: dict[str, dict[str, Tensor]] = {}
    width = state["mask_token"].shape[-1] if "mask_token" in state else None
    for key, value in state.items():
        if key == "encoder_to_decoder.weight":
            out["decoder.embed.weight"] = value
            out.setdefault("decoder.embed.bias", value.new_zeros(value.shape[0]))
        elif key == "encoder_to_decoder.bias":
            out["decoder.embed.bias"] = value
        elif key == "mask_token":
            out["decoder.mask_token"] = value
        elif key == "pos_embed" and value.shape[-1] == width:
            _check_videomae_positions(value, num_tokens)
        elif key.startswith("decoder.blocks.") and (".gamma_" in key):
            raise InteropError(f"{key}: layer-scale weights (init_values > 0) have no counterpart in maeframe's "
                               f"blocks")
        elif key.startswith("decoder.blocks.") and key.endswith((".attn.q_bias", ".attn.v_bias")):
            block, _, kind = key[len("decoder."):].rpartition(".")
            biases.setdefault(block, {})[kind] = value
        elif key.startswith(("decoder.blocks.", "decoder.norm.", "decoder.head.")):
            out[key] = value
    if out and not {"decoder.embed.weight", "decoder.mask_token", "decoder.head.weight"} <= set(out):
        raise InteropError(f"an incomplete VideoMAE decoder: encoder_to_decoder.weight, mask_token and "
                           f"decoder.head.weight are needed, found {sorted(out)[:6]}")
    merge_qv_biases(out, biases, "decoder.")
    return out


def maeframe_to_videomae(state: dict[str, Tensor], spec) -> dict[str, Tensor]:
    """A maeframe MaskedAutoencoder state dict of layout "videomae" -> VideoMAE pretraining names (the inverse
    of `videomae_to_maeframe` + `videomae_decoder_to_maeframe`; for tests and hand-over). The qkv key biases
    and the decoder.embed bias must be zero (VideoMAE has none)."""
    out: dict[str, Tensor] = {}
    dim = state["encoder.patch_embed.weight"].shape[0]
    for key, value in state.items():
        if key == "encoder.patch_embed.weight":
            out["encoder.patch_embed.proj.weight"] = value.reshape(dim, *spec.patch_size, spec.channels) \
                .permute(0, 4, 1, 2, 3).contiguous()
        elif key == "encoder.patch_embed.bias":
            out["encoder.patch_embed.proj.bias"] = value
        elif key.endswith(".attn.qkv.bias"):
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                raise InteropError(f"{key}: VideoMAE's key projection has no bias, this one is not zero")
            out[key.replace(".qkv.bias", ".q_bias")], out[key.replace(".qkv.bias", ".v_bias")] = q, v
        elif key == "decoder.embed.weight":
            out["encoder_to_decoder.weight"] = value
        elif key == "decoder.embed.bias":
            if value.abs().max() > 0:
                raise InteropError("decoder.embed.bias: VideoMAE's encoder_to_decoder has no bias, this one is not zero")
        elif key == "decoder.mask_token":
            out["mask_token"] = value
        else:
            out[key] = value
    return out


def _check_videomae_positions(value: Tensor, num_tokens: int | None) -> None:
    table = value.reshape(-1, value.shape[-1]).float()
    if num_tokens is not None and table.shape[0] != num_tokens:
        raise InteropError(f"pos_embed has {table.shape[0]} positions but the recipe's token grid has {num_tokens} "
                           f"(another num_frames, image_size, tubelet or patch size)")
    diff = (table - videomae_positions(*table.shape)).abs().max().item()
    if diff > 1e-4:
        raise InteropError(f"pos_embed differs from VideoMAE's fixed sinusoid table (max abs diff {diff:.3g}): "
                           f"learned positions are not supported")


def audiomae_to_maeframe(state_dict: Any, grid: tuple[int, int]) -> dict[str, Tensor]:
    """AudioMAE weights (pretraining or fine-tuned) -> maeframe `encoder.*` tensors for the `spectrogram`
    tokenizer's (time, frequency) grid; the stored 2-D sin-cos pos_embed must be that grid's."""
    state = {k: v for k, v in unwrap_reference(state_dict).items() if not k.startswith(AUDIOMAE_DROPPED)}
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.dim() != 4 or weight.shape[1] != 1:
        shape = None if weight is None else list(weight.shape)
        raise InteropError(f"patch_embed.proj.weight is {shape}; AudioMAE's is a Conv2d weight [D, 1, pt, pf] "
                           f"over the 1-channel fbank")
    if "pos_embed" in state and state["pos_embed"].shape[1] - 1 != math.prod(grid):
        rows = state["pos_embed"].shape[1] - 1
        raise InteropError(f"pos_embed has {rows} positions but the spectrogram grid {tuple(grid)} has "
                           f"{math.prod(grid)}: set tokenizer.options.target_length / num_mel_bins / patch_size "
                           f"as pretrained (AudioMAE AudioSet: 1024 × 128, 16 × 16 -> 64 × 8; overlapping "
                           f"patches are not supported)")
    converted, _ = official_to_maeframe(state, tuple(grid))
    return {k: v for k, v in converted.items() if k.startswith("encoder.")}


def audiomae_autoencoder_to_maeframe(state_dict: Any, grid: tuple[int, int]) -> dict[str, Tensor]:
    """AudioMAE pretraining weights -> a whole maeframe MaskedAutoencoder state dict: the encoder as
    `audiomae_to_maeframe`, the decoder renamed as MAE's (decoder_embed, mask_token, decoder_blocks.{i},
    decoder_norm, decoder_pred -> decoder.embed, decoder.mask_token, decoder.blocks.{i}, decoder.norm,
    decoder.head; the Swin V2 blocks of `decoder_mode=1` keep their inner names, which
    `maeframe.model.cosine_window.CosineWindowedBlock` shares), `decoder_pos_embed` checked against the
    grid's sin-cos. Weights without a decoder give the encoder only."""
    state = {k: v for k, v in unwrap_reference(state_dict).items() if not k.startswith(("head.", "fc_norm."))}
    encoder = audiomae_to_maeframe(state, grid)
    decoder = {k: v for k, v in state.items() if k.startswith(AUDIOMAE_DROPPED[:2])}
    if not decoder:
        return encoder
    converted, _ = official_to_maeframe(decoder, tuple(grid))
    return {**encoder, **converted}


def read_reference(path: str | Path) -> dict[str, Tensor]:
    """A reference .pth read with torch.load(weights_only=True) -> its state dict."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InteropError(f"{path}: cannot be read with torch.load(weights_only=True) ({first}); if you trust the "
                           f"file, re-save only its weights: torch.save({{'model': ...['model']}}, 'weights.pth')") from err
    try:
        return unwrap_reference(state)
    except InteropError as err:
        raise InteropError(f"{path}: {err}") from None
