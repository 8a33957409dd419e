"""Export a pretrained encoder as safetensors in timm's VisionTransformer layout.

Written keys (D width, N = gh·gw tokens): cls_token [1, 1, D], pos_embed [1, 1 + N, D] (sin-cos, zero cls
row), patch_embed.proj.weight [D, C, p, p] and .bias [D], blocks.{i}.*, norm.* -- exactly the parameters
of `timm.create_model(name, num_classes=0)`, so the file loads with strict=True.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import Tensor

from ..engine.checkpoint import load_checkpoint
from ..tokenizer import TokenSpec
from .official_mae import InteropError, infer_config, maeframe_to_official, official_to_maeframe, read_official

# width -> (timm size name, depth, heads) of the standard ViTs (mlp ratio 4)
SIZES = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
         1280: ("huge", 32, 16)}
ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def _maeframe_source(state: dict[str, Any]) -> tuple[dict[str, Tensor], TokenSpec, int]:
    """A maeframe checkpoint -> (model state dict, the recipe tokenizer's spec, encoder heads)."""
    from ..plugins import make_plugin_manager
    from ..registry import Registry

    recipe = state["recipe"]
    ref = recipe["tokenizer"]
    entry = Registry(make_plugin_manager(recipe.get("plugins", []))).get("tokenizer", ref["name"])
    tokenizer = entry.cls(entry.cls.Options.model_validate(ref.get("options", {})))
    return state["model"], tokenizer.spec, recipe["model"]["num_heads"]


def _official_source(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], TokenSpec, int]:
    config, patch, chans, grid = infer_config(state)
    patch = (patch, patch) if isinstance(patch, int) else patch
    converted, _ = official_to_maeframe(state, grid)
    return converted, TokenSpec(grid, patch, chans), config["num_heads"]


def timm_kwargs(weights: dict[str, Tensor], spec: TokenSpec, heads: int) -> dict[str, Any]:
    """The timm.create_model keyword arguments that describe this encoder exactly."""
    (gh, gw), (p, q) = spec.grid, spec.patch_size
    dim = weights["cls_token"].shape[-1]
    return {"img_size": gh * p if (gh * p, p) == (gw * q, q) else (gh * p, gw * q),
            "patch_size": p if p == q else (p, q), "in_chans": spec.channels, "embed_dim": dim,
            "depth": len({k.split(".")[1] for k in weights if k.startswith("blocks.")}), "num_heads": heads,
            "mlp_ratio": weights["blocks.0.mlp.fc1.weight"].shape[0] / dim}


def infer_timm_name(kwargs: dict[str, Any], heads_known: bool = True) -> str:
    """A registered timm name whose defaults equal `kwargs` (e.g. vit_base_patch16_224), or a clear error."""
    size = SIZES.get(kwargs["embed_dim"])
    name = f"vit_{size[0] if size else '?'}_patch{kwargs['patch_size']}_{kwargs['img_size']}"
    standard = size is not None and (kwargs["depth"], kwargs["num_heads"], kwargs["mlp_ratio"]) == (*size[1:], 4.0)
    if standard and kwargs["in_chans"] == 3 and timm.is_model(name):
        return name
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    guess = "" if heads_known else " (num_heads is not stored in reference weights: use the trained value)"
    raise InteropError(f"no registered timm model has this encoder's architecture ({args}); pass --timm-name "
                       f"(e.g. vit_base_patch16_224) and build the model with timm.create_model(name, "
                       f"num_classes=0, {args}){guess}")


def export_encoder(checkpoint_path: str | Path, output_path: str | Path,
                   timm_name: str | None = None) -> tuple[Path, str]:
    """maeframe checkpoint or reference MAE .pth -> timm ViT safetensors. Returns (output path, timm name)."""
    source, output = Path(checkpoint_path), Path(output_path)
    if output.suffix != ".safetensors":
        raise InteropError(f"{output}: the output must end in .safetensors (timm picks the reader by suffix)")
    try:
        state = load_checkpoint(source)
    except FileNotFoundError:
        raise
    except Exception:  # not a maeframe checkpoint: read it as reference weights (clear error if neither)
        state = None
    if state is not None:
        model_state, spec, heads = _maeframe_source(state)
    else:
        try:
            model_state, spec, heads = _official_source(read_official(source))
        except InteropError as err:
            raise InteropError(str(err) if str(source) in str(err) else f"{source}: {err}") from None
    weights = {k: v.detach().cpu().contiguous() for k, v in maeframe_to_official(model_state, spec).items()
               if k.startswith(ENCODER_KEYS)}
    if timm_name is None:
        timm_name = infer_timm_name(timm_kwargs(weights, spec, heads), heads_known=state is not None)
    elif not timm.is_model(timm_name):
        raise InteropError(f"timm has no model named {timm_name!r} (see timm.list_models('vit_*'))")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        save_file(weights, tmp, metadata={"format": "pt", "timm_name": timm_name, "source": source.name})
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output, timm_name
