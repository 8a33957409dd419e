"""Hugging Face transformers directories as `init.format` weight formats (registered through
`register_weight_formats`, as any third-party format would be):

* `hf`: ViT / ViTMAE directories -- written by `maeframe export --format hf` or by transformers'
  `save_pretrained` (ViTMAEForPreTraining, ViTMAEModel, ViTModel, ViTForImageClassification; heads, pooler and
  decoder are ignored). The encoder runs in maeframe's layout (cls token, 2-D sin-cos positions); the stored
  position table must be that sin-cos (checked, as for official MAE weights).
* `hf_videomae`: VideoMAE directories (VideoMAEForPreTraining, VideoMAEModel, VideoMAEForVideoClassification):
  no cls token and VideoMAE's 1-D sinusoid table over the token index, as `official_videomae`.

config.json is checked against the recipe (width, depth, heads, MLP width, patch or tubelet size, channels);
every error names the file, the tensors and the reason. transformers itself is not needed to read them.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maeframe import EncoderLayout, WeightFormat, hookimpl
from maeframe.interop import (InteropError, canonical_hf_name, check_hf_config, check_hf_shapes, hf_grid,
                              hf_to_official, official_to_maeframe, read_hf_directory, reference_block_name)

from .hf_videomae_export import to_videomae
from .official_av import videomae_positions, videomae_to_maeframe

VIT_TYPES = ("vit", "vit_mae")


class HFWeights(WeightFormat):
    """A transformers ViT / ViTMAE directory (config.json + model.safetensors)."""

    reads_directories = True

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        config, tensors = read_hf_directory(path)
        config_file, kind = Path(path) / "config.json", config.get("model_type")
        if kind == "videomae":
            raise InteropError(f"{config_file}: a VideoMAE model (no cls token, 1-D sinusoid positions); set "
                               f"init.format: hf_videomae")
        if kind not in VIT_TYPES:
            raise InteropError(f"{config_file}: model_type {kind!r} is not one of {list(VIT_TYPES)} (ViT, ViTMAE)")
        if len(spec.grid) != 2:
            raise InteropError(f"{config_file}: a 2-D ViT, but the recipe's token grid {spec.grid} is not 2-D")
        grid, patch = hf_grid(config, config_file)
        check_hf_config(config, config_file, patch, spec.patch_size, spec.channels, model)
        check_hf_shapes(tensors, config, str(path))
        reference = {k: v for k, v in hf_to_official(tensors, str(path)).items()
                     if not k.startswith(("decoder_", "mask_token"))}
        try:
            weights, _ = official_to_maeframe(reference, grid)
        except InteropError as err:
            raise InteropError(f"{path}: {_hf_names(str(err))}") from None
        return weights


def _hf_names(message: str) -> str:
    """A message about reference names, with transformers' names of the position tables beside them."""
    return message.replace("pos_embed has", "pos_embed (embeddings.position_embeddings) has").replace(
        "pos_embed differs", "pos_embed (embeddings.position_embeddings) differs")


def videomae_reference(tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """transformers VideoMAE names -> the reference VideoMAE encoder names `videomae_to_maeframe` reads
    (decoder, mask token, fc_norm and classifier are dropped there)."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for original, value in tensors.items():
        key = canonical_hf_name(original[len("videomae."):] if original.startswith("videomae.") else original)
        match = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", key)
        if key.startswith(("decoder.", "encoder_to_decoder.", "mask_token", "fc_norm.", "classifier.")):
            continue
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.split(".", 1)[1]] = value
        elif match:
            block, rest = f"blocks.{match.group(1)}.", match.group(2)
            names = {"attention.attention.q_bias": "attn.q_bias", "attention.attention.v_bias": "attn.v_bias",
                     "attention.attention.query.bias": "attn.q_bias", "attention.attention.value.bias": "attn.v_bias"}
            part = re.match(r"^attention\.attention\.(query|key|value)\.weight$", rest)
            if rest in names:
                out[block + names[rest]] = value
            elif part:
                qkv.setdefault(block + "attn.qkv.weight", {})[part.group(1)] = value
            elif (name := reference_block_name(rest)) is not None:
                out[block + name] = value
            else:
                unknown.append(original)
        else:
            unknown.append(original)
    if unknown:
        raise InteropError(f"{source}: tensors that are not part of a VideoMAE model: {', '.join(unknown[:6])}")
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise InteropError(f"{source}: {key[:-len('.qkv.weight')]} has only {sorted(parts)} of query, key, value")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


class HFVideoMAEWeights(WeightFormat):
    """A transformers VideoMAE directory: encoder without cls token, VideoMAE's fixed sinusoid positions."""

    reads_directories = True

    @property
    def layout(self) -> EncoderLayout:
        return EncoderLayout(cls_token=False, positions=videomae_positions)

    def to_transformers(self, model: dict[str, Tensor], prepared, layout: EncoderLayout,
                        encoder_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """`video_tube` checkpoints in VideoMAE's layout as VideoMAEForPreTraining / VideoMAEModel
        (plugins/hf_videomae_export.py says what exports exactly)."""
        return to_videomae(model, prepared, layout, encoder_only)

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        config, tensors = read_hf_directory(path)
        config_file = Path(path) / "config.json"
        if config.get("model_type") != "videomae":
            raise InteropError(f"{config_file}: model_type {config.get('model_type')!r} is not 'videomae'; for "
                               f"ViT / ViTMAE directories set init.format: hf")
        if len(spec.grid) != 3:
            raise InteropError(f"{config_file}: a VideoMAE model, but the recipe's token grid {spec.grid} is not "
                               f"(time, height, width)")
        patch = config.get("patch_size", 16)
        check_hf_config(config, config_file, (config.get("tubelet_size", 2), patch, patch), spec.patch_size,
                        spec.channels, model)
        (height, width) = (lambda v: (v, v) if isinstance(v, int) else tuple(v))(config.get("image_size", 224))
        tokens = config.get("num_frames", 16) // config.get("tubelet_size", 2) * (height // patch) * (width // patch)
        if tokens != math.prod(spec.grid):
            raise InteropError(f"{config_file}: num_frames / image_size give {tokens} tokens, the recipe's grid "
                               f"{spec.grid} has {math.prod(spec.grid)}; VideoMAE's fixed positions are defined "
                               f"per token index, so set the tokenizer's frames and size as in config.json")
        try:
            return videomae_to_maeframe(videomae_reference(tensors, str(path)), spec.num_tokens)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None


@hookimpl
def register_weight_formats(register):
    register("hf", HFWeights)
    register("hf_videomae", HFVideoMAEWeights)
