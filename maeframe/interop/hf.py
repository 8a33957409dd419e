"""Hugging Face transformers' ViT / ViTMAE names <-> the reference MAE layout (see official_mae.py), shared by
`maeframe export --format hf` and the `init.format: hf` reader.

Written names are those of transformers 4.x (D width, N = gh·gw tokens, C channels, p×p patches), which
transformers 5.x still reads (its loading renames them) and writes again itself:
    {P}embeddings.cls_token [1, 1, D]               {P}embeddings.position_embeddings [1, 1 + N, D]
    {P}embeddings.patch_embeddings.projection.weight [D, C, p, p] (and .bias)
    {P}encoder.layer.{i}.layernorm_before / layernorm_after, .attention.attention.query / key / value,
        .attention.output.dense, .intermediate.dense, .output.dense       {P}layernorm
    decoder.decoder_embed, decoder.mask_token, decoder.decoder_pos_embed [1, 1 + N, d],
    decoder.decoder_layers.{i}.* (as the encoder's layers), decoder.decoder_norm, decoder.decoder_pred
with P = "vit." for ViTMAE (ViTMAEForPreTraining, ViTMAEModel inside it) and "" for ViTModel. Read: also the
names transformers 5.x keeps in memory (`layers.{i}`, `attention.q_proj`, `mlp.fc1`, ...) and the decoder
names 5.x writes (`decoder.decoder_encoder.layer.{i}`); `pooler.*` and `classifier.*` heads are dropped.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .official_mae import InteropError

QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# (reference name inside a block, transformers 4.x name) for the tensors that are renamed one to one
BLOCK = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.output.dense."),
         ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense.")]
# (reference name, transformers name without the encoder prefix P) outside the blocks
ENCODER = [("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
           ("patch_embed.proj.", "embeddings.patch_embeddings.projection."), ("norm.", "layernorm.")]
DECODER = [("decoder_embed.", "decoder.decoder_embed."), ("mask_token", "decoder.mask_token"),
           ("decoder_pos_embed", "decoder.decoder_pos_embed"), ("decoder_norm.", "decoder.decoder_norm."),
           ("decoder_pred.", "decoder.decoder_pred.")]
# transformers >= 5 names -> 4.x names (regex, replacement), applied in this order when reading
NEWER_NAMES = [(r"^(vit\.)?layers\.(\d+)\.", r"\1encoder.layer.\2."),
               (r"^decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1."),
               (r"\.attention\.q_proj\.", ".attention.attention.query."),
               (r"\.attention\.k_proj\.", ".attention.attention.key."),
               (r"\.attention\.v_proj\.", ".attention.attention.value."),
               (r"\.attention\.o_proj\.", ".attention.output.dense."),
               (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense.")]
DROPPED = ("pooler.", "classifier.", "vit.pooler.")
MAEFRAME_EPS = 1e-6  # the LayerNorm eps of maeframe's blocks and norms (maeframe.model.vit.LayerNorm)


def _rename(name: str, pairs: list[tuple[str, str]], forward: bool) -> str | None:
    for ref, hf in pairs:
        src, dst = (ref, hf) if forward else (hf, ref)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def canonical_hf_name(key: str) -> str:
    """A transformers tensor name in its 4.x form (transformers >= 5 in-memory names are renamed back)."""
    for pattern, replacement in NEWER_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def reference_block_name(rest: str) -> str | None:
    """The reference name inside a block of a transformers 4.x layer name (`layernorm_before.weight` ->
    `norm1.weight`), for the one-to-one renamed tensors; None for query/key/value and unknown names."""
    return _rename(rest, BLOCK, forward=False)


def hf_block_name(rest: str) -> str | None:
    """The transformers 4.x layer name of a reference name inside a block (`norm1.weight` ->
    `layernorm_before.weight`), for the one-to-one renamed tensors; None for qkv and unknown names."""
    return _rename(rest, BLOCK, forward=True)


def official_to_hf(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Reference MAE layout -> transformers 4.x names; `prefix` is P ("vit." for ViTMAE, "" for ViTModel).
    Each qkv [3D, D] (and bias [3D]) is split into query, key and value."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^(decoder_blocks|blocks)\.(\d+)\.(.*)$", key)
        if match:
            where, index, rest = match.groups()
            decoder = where == "decoder_blocks"
            layer = f"decoder.decoder_layers.{index}." if decoder else f"{prefix}encoder.layer.{index}."
            if rest.startswith("attn.qkv."):
                for name, part in zip(QKV, value.chunk(3, dim=0)):
                    out[f"{layer}{name}.{rest.rsplit('.', 1)[1]}"] = part.contiguous()
            elif (name := _rename(rest, BLOCK, forward=True)) is not None:
                out[layer + name] = value
            else:
                raise InteropError(f"{key} has no counterpart in transformers' ViT layer")
        elif (name := _rename(key, ENCODER, forward=True)) is not None:
            out[prefix + name] = value
        elif (name := _rename(key, DECODER, forward=True)) is not None:
            out[name] = value
        else:
            raise InteropError(f"{key} has no counterpart in transformers' ViTMAE")
    return out


def hf_to_official(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """transformers ViT / ViTMAE tensors (4.x or 5.x names, any of the prefixes "vit.", "") -> reference MAE
    layout. Layers without q/k/v biases (qkv_bias false) get zero biases, which is what they compute."""
    state = {key: value for key, value in state.items() if not key.startswith(DROPPED)}
    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for original, value in state.items():
        key = canonical_hf_name(original)
        if prefix and not key.startswith(("vit.", "decoder.")):
            unknown.append(original)
            continue
        key = key[len(prefix):] if key.startswith(prefix) else key
        match = re.match(r"^(decoder\.decoder_layers|encoder\.layer)\.(\d+)\.(.*)$", key)
        if match:
            where, index, rest = match.groups()
            block = f"{'decoder_blocks' if where.startswith('decoder') else 'blocks'}.{index}."
            part = next((i for i, name in enumerate(QKV) if rest.startswith(name + ".")), None)
            if part is not None:
                qkv.setdefault(block + "attn.qkv." + rest.rsplit(".", 1)[1], {})[QKV[part]] = value
            elif (name := reference_block_name(rest)) is not None:
                out[block + name] = value
            else:
                unknown.append(original)
        elif (name := _rename(key, ENCODER, forward=False) or _rename(key, DECODER, forward=False)) is not None:
            out[name] = value
        else:
            unknown.append(original)
    if unknown:
        raise InteropError(f"{source}: tensors that are not part of a ViT / ViTMAE model: {', '.join(unknown[:6])}"
                           f"{' ...' if len(unknown) > 6 else ''}")
    for key, parts in qkv.items():
        if len(parts) != 3:
            raise InteropError(f"{source}: {key.rsplit('.', 1)[0]} has only {sorted(parts)} of query, key and value")
        out[key] = torch.cat([parts[name] for name in QKV])
    for key in [k for k in out if k.endswith("attn.qkv.weight")]:
        bias = key[:-len("weight")] + "bias"
        if bias not in out:
            out[bias] = out[key].new_zeros(out[key].shape[0])
    return out


def encoder_shapes(config: dict[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    """The transformers 4.x names and shapes of the ViT encoder config.json describes (prefix P as above)."""
    (gh, gw), (p, q) = hf_grid(config, Path("config.json"))
    width, inner = config.get("hidden_size", 768), config.get("intermediate_size", 3072)
    depth = config.get("num_hidden_layers", 12)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, width), "embeddings.position_embeddings": (1, 1 + gh * gw, width),
        "embeddings.patch_embeddings.projection.weight": (width, config.get("num_channels", 3), p, q),
        "embeddings.patch_embeddings.projection.bias": (width,), "layernorm.weight": (width,),
        "layernorm.bias": (width,)}
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        for name in (*QKV, "attention.output.dense"):
            shapes |= {f"{layer}{name}.weight": (width, width), f"{layer}{name}.bias": (width,)}
        shapes |= {f"{layer}intermediate.dense.weight": (inner, width), f"{layer}intermediate.dense.bias": (inner,),
                   f"{layer}output.dense.weight": (width, inner), f"{layer}output.dense.bias": (width,)}
        shapes |= {f"{layer}{norm}.{t}": (width,) for norm in ("layernorm_before", "layernorm_after")
                   for t in ("weight", "bias")}
    return {prefix + name: shape for name, shape in shapes.items()}


def check_hf_shapes(tensors: dict[str, Tensor], config: dict[str, Any], source: str) -> None:
    """Every encoder tensor has the shape config.json implies (4.x or 5.x names); a tensor that is absent is
    left to the conversion (biases of qkv_bias false) or to the encoder load, which names it."""
    prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
    expected = encoder_shapes(config, prefix)
    wrong = []
    for original, value in tensors.items():
        key = canonical_hf_name(original)
        if key in expected and tuple(value.shape) != expected[key]:
            wrong.append(f"{original} {list(value.shape)} (config.json implies {list(expected[key])})")
    if wrong:
        raise InteropError(f"{source}: tensors whose shapes contradict config.json: " + "; ".join(wrong[:4])
                           + (f"; ... {len(wrong) - 4} more" if len(wrong) > 4 else ""))


def vit_config(*, width: int, depth: int, heads: int, mlp_ratio: float, image_size: tuple[int, int],
               patch_size: int, channels: int) -> dict[str, Any]:
    """The config.json fields (present in transformers 4.40 .. 5.x) describing maeframe's encoder as a ViT."""
    height, wide = image_size
    return {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
            "intermediate_size": int(round(width * mlp_ratio)), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
            "image_size": height if height == wide else [height, wide], "patch_size": patch_size,
            "num_channels": channels, "qkv_bias": True}


def vitmae_config(encoder: dict[str, Any], *, width: int, depth: int, heads: int, mlp_ratio: float,
                  mask_ratio: float, norm_pix_loss: bool) -> dict[str, Any]:
    """ViTMAEForPreTraining's config.json: `vit_config` plus the decoder, mask ratio and norm_pix_loss."""
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", **encoder,
            "decoder_hidden_size": width, "decoder_num_hidden_layers": depth, "decoder_num_attention_heads": heads,
            "decoder_intermediate_size": int(round(width * mlp_ratio)), "mask_ratio": mask_ratio,
            "norm_pix_loss": norm_pix_loss}


def read_hf_directory(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers directory -> (config.json as a dict, every tensor of model.safetensors, of the shards of
    model.safetensors.index.json, or of pytorch_model.bin)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path}: a Hugging Face checkpoint is a directory with config.json and "
                           f"model.safetensors (e.g. written by save_pretrained or `maeframe export --format hf`)")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(f"{config_file}: missing; a Hugging Face checkpoint directory has a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InteropError(f"{config_file}: not valid JSON ({err})") from None
    index, legacy = path / "model.safetensors.index.json", path / "pytorch_model.bin"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise InteropError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
    elif legacy.is_file():
        try:
            return config, torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for foreign or truncated files
            raise InteropError(f"{legacy}: cannot be read with torch.load(weights_only=True) ({err})") from None
    else:
        raise InteropError(f"{path}: holds no model.safetensors (nor an index of shards, nor pytorch_model.bin)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise InteropError(f"{file}: cannot be read as safetensors ({type(err).__name__}: {err})") from None
    return config, tensors


def hf_grid(config: dict[str, Any], config_file: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """config.json's (token grid, patch size) of a ViT / ViTMAE."""
    as_pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    try:
        (height, width), (p, q) = as_pair(config.get("image_size", 224)), as_pair(config.get("patch_size", 16))
    except (TypeError, ValueError):
        raise InteropError(f"{config_file}: image_size {config.get('image_size')!r} / patch_size "
                           f"{config.get('patch_size')!r} are not sizes") from None
    return (height // p, width // q), (p, q)


def check_hf_config(config: dict[str, Any], config_file: Path, patch: tuple[int, ...], patch_size: tuple[int, ...],
                    channels: int, model: Any) -> None:
    """config.json describes the recipe's encoder (`model`, an EncoderConfig): width, depth, heads, MLP width,
    channels, an exact GELU, and its patch (`patch`, as read from the config) is the recipe's `patch_size`.
    Every difference is listed with the recipe field to change."""
    want = {"hidden_size": ("model.embed_dim", model.embed_dim), "num_hidden_layers": ("model.depth", model.depth),
            "num_attention_heads": ("model.num_heads", model.num_heads),
            "intermediate_size": ("model.mlp_ratio × embed_dim", int(round(model.embed_dim * model.mlp_ratio))),
            "num_channels": ("tokenizer.options.channels", channels)}
    problems = [f"{key} is {config.get(key)!r}, the recipe's {field} gives {value!r}"
                for key, (field, value) in want.items() if config.get(key) != value]
    if tuple(patch) != tuple(patch_size):
        problems.append(f"the patch is {list(patch)}, the recipe's tokenizer.options.patch_size gives "
                        f"{list(patch_size)}")
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act is {config.get('hidden_act')!r}; maeframe's blocks use the exact GELU (gelu)")
    eps = config.get("layer_norm_eps", 1e-12)
    if eps > MAEFRAME_EPS:
        problems.append(f"layer_norm_eps is {eps}; maeframe's LayerNorms use {MAEFRAME_EPS}")
    if problems:
        raise InteropError(f"{config_file}: does not describe the recipe's encoder: " + "; ".join(problems))
    if eps != MAEFRAME_EPS:  # e.g. transformers' default 1e-12 (facebook/vit-mae-*; the MAE reference used 1e-6)
        warnings.warn(f"{config_file}: layer_norm_eps is {eps}, maeframe's LayerNorms use {MAEFRAME_EPS}: each "
                      f"LayerNorm output differs by a relative ~{MAEFRAME_EPS / 2:g} / (variance of its input) from "
                      f"what transformers computes", stacklevel=2)
