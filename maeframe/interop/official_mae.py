"""Weights in the layout of the reference MAE code (`models_mae.MaskedAutoencoderViT`) <-> maeframe.

Reference layout (D encoder width, d decoder width, N = gh·gw tokens, C channels, p×q patches):
    cls_token [1, 1, D]              pos_embed [1, 1 + N, D] (fixed sin-cos, zero cls row)
    patch_embed.proj.weight [D, C, p, q] (a stride-p convolution), patch_embed.proj.bias [D]
    blocks.{i}.*, norm.*             (timm Blocks, the same names as maeframe's encoder)
    decoder_embed.*, mask_token [1, 1, d], decoder_pos_embed [1, 1 + N, d], decoder_blocks.{i}.*,
    decoder_norm.*, decoder_pred.*   (absent from the encoder-only pretrain releases)
maeframe keeps the position embeddings as non-persistent buffers and embeds flat (p, q, C) patches
with a Linear [D, p·q·C], so the conversion drops/recreates the pos-embeds and reshapes one weight.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaeframeError
from ..model.pos_embed import sincos_pos_embed
from ..tokenizer import TokenSpec

# (reference prefix, maeframe prefix); a prefix ending without "." names one tensor.
RENAMES = [
    ("patch_embed.proj.bias", "encoder.patch_embed.bias"),
    ("cls_token", "encoder.cls_token"),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("decoder_embed.", "decoder.embed."),
    ("mask_token", "decoder.mask_token"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.head."),
]
PATCH_WEIGHT = ("patch_embed.proj.weight", "encoder.patch_embed.weight")
POS_EMBEDS = {"pos_embed": "encoder", "decoder_pos_embed": "decoder"}
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {512: 16}  # the reference uses 16 decoder heads for every released model
TOLERANCE = 1e-5


class InteropError(MaeframeError, ValueError):
    """Weights that cannot be converted or loaded; the message names the file or the key."""


def _rename(key: str, to_maeframe: bool) -> str | None:
    for official, ours in RENAMES:
        src, dst = (official, ours) if to_maeframe else (ours, official)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def official_name(key: str) -> str:
    """The reference name of a maeframe key (for messages); the key itself if it has none."""
    if key == PATCH_WEIGHT[1]:
        return PATCH_WEIGHT[0]
    return _rename(key, to_maeframe=False) or key


def unwrap(state: Any) -> dict[str, Tensor]:
    """Accept the raw state dict or the reference's {'model': state_dict, ...} checkpoint."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InteropError("expected a state dict of tensors (or {'model': state_dict})")
    return state


def _square_grid(rows: int, key: str) -> tuple[int, int]:
    side = math.isqrt(rows)
    if side * side != rows:
        raise InteropError(f"{key}: {rows} positions is not a square grid; pass the grid explicitly")
    return side, side


def _check_pos_embed(key: str, value: Tensor, grid: tuple[int, ...] | None) -> tuple[tuple[int, ...], Tensor]:
    """value [1, 1 + N, D] -> (grid, cls row [1, 1, D]); raises unless rows 1.. are maeframe's sin-cos."""
    rows = value.shape[1] - 1
    grid = tuple(grid) if grid is not None else _square_grid(rows, key)
    if rows != math.prod(grid):
        raise InteropError(f"{key} has {rows} positions but the model's token grid {grid} has "
                           f"{math.prod(grid)}: the checkpoint was trained at another image or patch size")
    expected = sincos_pos_embed(grid, value.shape[-1])
    diff = (value[0, 1:].float() - expected).abs().max().item()
    if diff > TOLERANCE:
        raise InteropError(f"{key} differs from the fixed sin-cos embedding of grid {grid} (max abs diff "
                           f"{diff:.3g}): a different grid or learned positions, which maeframe does not use")
    return grid, value[:, :1]


def official_to_maeframe(state_dict: Any, grid: tuple[int, ...] | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Reference layout -> (maeframe MaskedAutoencoder state dict, missing prefixes such as ["decoder."]).

    grid: the model's token grid; by default the square grid of `pos_embed`. The pos-embeds are checked
    against maeframe's sin-cos and dropped; a non-zero encoder cls row is folded into `cls_token`
    (the reference adds it to the cls token only), a non-zero decoder cls row is an error.
    """
    state = unwrap(state_dict)
    if any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise InteropError("this is already a maeframe state dict (keys start with 'encoder.'/'decoder.')")
    out: dict[str, Tensor] = {}
    cls_rows: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in POS_EMBEDS:
            grid, cls_rows[POS_EMBEDS[key]] = _check_pos_embed(key, value, grid)
        elif key == PATCH_WEIGHT[0]:
            out[PATCH_WEIGHT[1]] = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
        elif (name := _rename(key, to_maeframe=True)) is not None:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"keys that are not part of an MAE pretraining model: {', '.join(unknown[:8])}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    if "encoder" in cls_rows and "encoder.cls_token" in out:
        out["encoder.cls_token"] = out["encoder.cls_token"] + cls_rows["encoder"].to(out["encoder.cls_token"])
    if "decoder" in cls_rows and cls_rows["decoder"].abs().max().item() > TOLERANCE:
        raise InteropError("decoder_pos_embed has a non-zero cls row, which maeframe's decoder cannot represent")
    missing = [p for p in ("encoder.", "decoder.") if not any(k.startswith(p) for k in out)]
    return out, missing


def maeframe_to_official(state_dict: dict[str, Tensor], spec: TokenSpec) -> dict[str, Tensor]:
    """maeframe MaskedAutoencoder state dict -> reference layout, with the pos-embeds [1, 1 + N, D] the
    reference stores (zero cls row). spec: the tokenizer's 2D TokenSpec (grid, patch size, channels)."""
    if len(spec.grid) != 2:
        raise InteropError(f"the reference layout is for 2D images; token grid {spec.grid} is not")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in ("encoder.pos_embed", "decoder.pos_embed"):
            continue
        if key == PATCH_WEIGHT[1]:
            (p, q), c = spec.patch_size, spec.channels
            out[PATCH_WEIGHT[0]] = value.reshape(value.shape[0], p, q, c).permute(0, 3, 1, 2).contiguous()
        elif (name := _rename(key, to_maeframe=False)) is not None:
            out[name] = value
        else:
            raise InteropError(f"{key} has no counterpart in the reference layout")
    for key, width_key in (("pos_embed", "cls_token"), ("decoder_pos_embed", "mask_token")):
        if width_key in out:
            pos = sincos_pos_embed(spec.grid, out[width_key].shape[-1])
            out[key] = torch.cat([torch.zeros_like(pos[:1]), pos])[None].to(out[width_key].dtype)
    return out


def read_official(path: str | Path) -> dict[str, Tensor]:
    """Read a reference .pth with torch.load(weights_only=True) and return its model state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InteropError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({first}). Reference training "
            f"checkpoints also pickle objects such as the argparse 'args'; if you trust the file, re-save only "
            f"its weights: torch.save({{'model': torch.load(path, weights_only=False)['model']}}, 'weights.pth')"
        ) from err
    try:
        return unwrap(state)
    except InteropError as err:
        raise InteropError(f"{path}: {err}") from None


def load_official_mae(path: str | Path, model: nn.Module) -> list[str]:
    """Load reference MAE weights into a maeframe `MaskedAutoencoder`.

    The encoder must match exactly. An encoder-only checkpoint leaves the decoder at its initialisation;
    the returned list names those decoder keys (empty when the checkpoint has a decoder).
    """
    path = Path(path)
    state = read_official(path)
    try:
        converted, _ = official_to_maeframe(state, grid=model.spec.grid)
    except InteropError as err:
        raise InteropError(f"{path}: {err}") from None
    own = model.state_dict()
    mismatched = [f"{k if k == PATCH_WEIGHT[1] else official_name(k)}: checkpoint {list(v.shape)} vs model "
                  f"{list(own[k].shape)}" for k, v in converted.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        more = f"; ... {len(mismatched) - 6} more" if len(mismatched) > 6 else ""
        raise InteropError(f"{path}: shapes differ from the model (a different architecture, e.g. ViT-L weights "
                           f"for a ViT-B recipe?): " + "; ".join(mismatched[:6]) + more)
    unexpected = [official_name(k) for k in converted if k not in own]
    missing = [k for k in own if k not in converted]
    has_decoder = any(k.startswith("decoder.") for k in converted)
    required = [official_name(k) for k in missing if has_decoder or not k.startswith("decoder.")]
    if unexpected or required:
        raise InteropError(f"{path}: does not match the model's depth/layout; missing {required[:8]}, "
                           f"unexpected {unexpected[:8]}")
    model.load_state_dict(converted, strict=False)
    return missing


def _heads(width: int, table: dict[int, int]) -> int:
    heads = table.get(width, max(1, width // 64))
    return heads if width % heads == 0 else 1


def infer_config(state_dict: Any) -> tuple[dict[str, Any], int | tuple[int, int], int, tuple[int, int]]:
    """From reference-layout tensor shapes: (ModelConfig fields, patch size, channels, token grid).

    Head counts are not stored in the weights; they come from the standard ViT table (else width // 64).
    Decoder fields are left out (ModelConfig defaults) when the checkpoint has no decoder.
    """
    state = unwrap(state_dict)
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise InteropError(f"cannot infer the architecture: {key} is missing")
    dim, chans, p, q = state["patch_embed.proj.weight"].shape
    config: dict[str, Any] = {
        "embed_dim": dim, "depth": _count_blocks(state, "blocks."), "num_heads": _heads(dim, HEADS),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    }
    if "decoder_embed.weight" in state:
        width = state["decoder_embed.weight"].shape[0]
        ratio = state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / width
        if ratio != config["mlp_ratio"]:
            raise InteropError(f"decoder mlp ratio {ratio} differs from the encoder's {config['mlp_ratio']}; "
                               f"maeframe uses one mlp_ratio for both")
        config.update(decoder_embed_dim=width, decoder_depth=_count_blocks(state, "decoder_blocks."),
                      decoder_num_heads=_heads(width, DECODER_HEADS))
    grid = _square_grid(state["pos_embed"].shape[1] - 1, "pos_embed")
    return config, (p if p == q else (p, q)), chans, grid


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
