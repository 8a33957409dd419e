"""maeframe checkpoints in VideoMAE's layout -> transformers VideoMAE directories (`maeframe export --format hf`,
through `HFVideoMAEWeights.to_transformers`).

Exportable: a `video_tube` checkpoint trained with `model.cls_token: false` and `model.positions: flat` (VideoMAE's
layout: no cls token, one sinusoid table over the flattened (time, row, column) token order, which transformers
rebuilds from config.json) and square patches. With its decoder (`VideoMAEForPreTraining`, the same logits of
the masked tokens and the same loss for the same `bool_masked_pos`) it also needs:
* `model.decoder_embed_bias: false` (VideoMAE's encoder_to_decoder has no bias) and global decoder attention;
* the `pixel` target in the form transformers' loss computes, and `losses: [{name: mse, weight: 1.0}]`.
  transformers un-normalises `pixel_values` with ImageNet's mean M_c and std S_c (3 channels; other channel
  counts are used as given), then normalises each tubelet per channel: (x - mean) / (unbiased std + 1e-6). On
  maeframe's normalised patches that is `norm_pix: true, norm_over: channel, eps_after_sqrt: true` with eps
  1e-6 / S_c per channel (1e-6 without the un-normalisation): the mean cancels and S_c scales std and eps
  alike, so the loss is the same for whatever mean/std the dataset normalised with. Raw pixels (norm_pix:
  false) never match: transformers' labels are then the un-normalised pixels x·S + M (and an error for other
  than 3 channels), maeframe's the normalised ones.
Written as transformers 4.x names (transformers 5.x renames them on loading): per block q_bias and v_bias;
the key bias of maeframe's qkv is dropped, which is exact: it adds q·b_k to every logit of a query's row, and
the softmax of a row is unchanged by a constant. Known difference: transformers' `decoder.norm` LayerNorm uses
eps 1e-5 (maeframe's and VideoMAE's 1e-6), a relative change of about 4.5e-6 / (variance of its input).
"""
from __future__ import annotations

import math
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_STD
from torch import Tensor

from maeframe import EncoderLayout, flat_sincos_pos_embed
from maeframe.interop import InteropError, hf_block_name

from .targets import PixelTarget

HF_EPS = 1e-6          # the constant transformers' VideoMAE loss adds to each tubelet's per-channel std
LAYER_NORM_EPS = 1e-6  # maeframe's LayerNorms (written as config.json's layer_norm_eps)


def encoder_problems(prepared, layout: EncoderLayout, model: dict[str, Tensor]) -> list[str]:
    """Why VideoMAEModel would not compute this encoder, each naming the recipe field to set."""
    spec = prepared.components.tokenizer.spec
    problems = []
    if layout.cls_token:
        problems.append("model.cls_token: false (VideoMAE has no cls token)")
    if layout.positions is not flat_sincos_pos_embed:
        problems.append("model.positions: flat (VideoMAE's one sinusoid table over the token order)")
    if spec.patch_size[1] != spec.patch_size[2]:
        problems.append(f"square patches in tokenizer.options.patch_size (VideoMAE's patch_size is one number; "
                        f"these are {list(spec.patch_size[1:])})")
    if "encoder.norm.weight" not in model:
        problems.append("an encoder with its final norm (a pretraining checkpoint, or fine-tuning with head.pool: "
                        "cls; average pooling replaced it by fc_norm)")
    return problems


def _eps_values(eps: float | tuple[float, ...], channels: int) -> tuple[float, ...]:
    return tuple(eps) if isinstance(eps, tuple) else (eps,) * channels


def decoder_problems(prepared, model: dict[str, Tensor]) -> list[str]:
    """Why VideoMAEForPreTraining's decoder and loss would not compute this checkpoint's, each with its fix."""
    recipe, components = prepared.recipe, prepared.components
    spec = components.tokenizer.spec
    if not any(key.startswith("decoder.") for key in model):
        return ["a decoder (this checkpoint has none; pass --encoder-only for VideoMAEModel)"]
    problems = []
    if "decoder.embed.bias" in model:
        problems.append("model.decoder_embed_bias: false (VideoMAE's encoder_to_decoder has no bias)")
    if recipe.model.decoder_attention != "global":
        problems.append("model.decoder_attention: global")
    if [(ref.name, ref.weight) for ref in recipe.losses] != [("mse", 1.0)]:
        problems.append("losses: [{name: mse, weight: 1.0}] (transformers' loss is the MSE of the masked tokens)")
    target = components.target
    want = tuple(HF_EPS / s for s in IMAGENET_DEFAULT_STD) if spec.channels == 3 else (HF_EPS,) * spec.channels
    form = (f"target pixel with norm_pix: true, norm_over: channel, eps_after_sqrt: true, eps: "
            f"{[float(f'{e:.6g}') for e in want] if spec.channels == 3 else HF_EPS}")
    if recipe.target.name != "pixel" or not isinstance(target, PixelTarget):
        problems.append(f"{form} (the decoder predicts target {recipe.target.name!r})")
        return problems
    options = target.options
    per_channel = options.norm_over == "channel" or spec.channels == 1
    eps = _eps_values(options.eps, spec.channels)
    exact = options.norm_pix and per_channel and options.eps_after_sqrt and all(
        math.isclose(have, wanted, rel_tol=1e-4) for have, wanted in zip(eps, want))
    if not exact:
        why = ("raw pixels never match: transformers' labels are the pixels un-normalised with ImageNet's mean and "
               "std" if not options.norm_pix else
               f"these options give norm_over {options.norm_over}, eps_after_sqrt {options.eps_after_sqrt}, eps "
               f"{list(eps)}; transformers un-normalises with ImageNet's std S_c and adds {HF_EPS} to each "
               f"tubelet's std")
        problems.append(f"{form} ({why})")
    return problems


def videomae_tensors(model: dict[str, Tensor], spec, encoder_only: bool) -> dict[str, Tensor]:
    """maeframe names -> transformers 4.x VideoMAE names (VideoMAEForPreTraining's; VideoMAEModel's without the
    `videomae.` prefix when `encoder_only`). Tubelets laid out (t, p, q, C) become the Conv3d kernel
    [D, C, t, p, q]; each qkv is split into query, key and value (q_bias, v_bias; the key bias is dropped)."""
    prefix = "" if encoder_only else "videomae."
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        where, _, rest = key.partition(".")
        if where == "decoder" and encoder_only or where not in ("encoder", "decoder"):
            continue
        if key == "encoder.patch_embed.weight":
            kernel = value.reshape(value.shape[0], *spec.patch_size, spec.channels).permute(0, 4, 1, 2, 3)
            out[prefix + "embeddings.patch_embeddings.projection.weight"] = kernel
        elif key == "encoder.patch_embed.bias":
            out[prefix + "embeddings.patch_embeddings.projection.bias"] = value
        elif key.startswith("encoder.norm."):
            out[prefix + "layernorm." + rest.split(".", 1)[1]] = value
        elif key == "decoder.embed.weight":
            out["encoder_to_decoder.weight"] = value
        elif key == "decoder.mask_token":
            out["mask_token"] = value
        elif key.startswith(("decoder.norm.", "decoder.head.")):
            out[key] = value
        elif rest.startswith("blocks."):
            _, index, inner = rest.split(".", 2)
            layer = f"{prefix}encoder.layer.{index}." if where == "encoder" else f"decoder.decoder_layers.{index}."
            if inner == "attn.qkv.weight":
                for name, part in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"{layer}attention.attention.{name}.weight"] = part
            elif inner == "attn.qkv.bias":
                q, _, v = value.chunk(3)  # the key bias: softmax-invariant (module docstring)
                out[f"{layer}attention.attention.q_bias"], out[f"{layer}attention.attention.v_bias"] = q, v
            elif (name := hf_block_name(inner)) is not None:
                out[layer + name] = value
            else:
                raise InteropError(f"{key} has no counterpart in transformers' VideoMAE layer")
        else:
            raise InteropError(f"{key} has no counterpart in transformers' VideoMAE")
    return {key: value.detach().float().cpu().contiguous() for key, value in out.items()}


def videomae_config(prepared, model: dict[str, Tensor], encoder_only: bool) -> dict[str, Any]:
    """config.json (fields of transformers 4.40 .. 5.x) for the recipe's encoder, and decoder unless
    `encoder_only`."""
    recipe, spec = prepared.recipe, prepared.components.tokenizer.spec
    m = recipe.model
    (steps, rows, cols), (tubelet, p, _) = spec.grid, spec.patch_size
    width = model["encoder.patch_embed.weight"].shape[0]
    depth = len({k.split(".")[2] for k in model if k.startswith("encoder.blocks.")})
    config = {"architectures": ["VideoMAEModel" if encoder_only else "VideoMAEForPreTraining"],
              "model_type": "videomae", "image_size": rows * p if rows == cols else [rows * p, cols * p],
              "patch_size": p, "num_channels": spec.channels, "num_frames": steps * tubelet, "tubelet_size": tubelet,
              "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": m.num_heads,
              "intermediate_size": int(round(width * m.mlp_ratio)), "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
              "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True, "use_mean_pooling": False}
    if not encoder_only:
        config.update(decoder_hidden_size=m.decoder_embed_dim, decoder_num_hidden_layers=m.decoder_depth,
                      decoder_num_attention_heads=m.decoder_num_heads,
                      decoder_intermediate_size=int(round(m.decoder_embed_dim * m.mlp_ratio)), norm_pix_loss=True)
    return config


def to_videomae(model: dict[str, Tensor], prepared, layout: EncoderLayout,
                encoder_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """A `video_tube` checkpoint -> (config.json, tensors) of VideoMAEForPreTraining (VideoMAEModel when
    `encoder_only`); None for other tokenizers; an InteropError listing every recipe field to set otherwise."""
    if prepared.recipe.tokenizer.name != "video_tube":
        return None
    problems = encoder_problems(prepared, layout, model) + ([] if encoder_only else decoder_problems(prepared, model))
    if problems:
        kind = "VideoMAEModel" if encoder_only else "VideoMAEForPreTraining"
        raise InteropError(f"cannot be exported as transformers' {kind}; pretrain with " + "; ".join(problems)
                           + ("" if encoder_only else " (or pass --encoder-only for VideoMAEModel)"))
    spec = prepared.components.tokenizer.spec
    return videomae_config(prepared, model, encoder_only), videomae_tensors(model, spec, encoder_only)
