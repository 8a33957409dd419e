"""Export a pretrained encoder as safetensors in timm's VisionTransformer layout.

Written keys (D width, N = gh·gw tokens): cls_token [1, 1, D], pos_embed [1, 1 + N, D] (sin-cos, zero cls
row), patch_embed.proj.weight [D, C, p, p] and .bias [D], blocks.{i}.*, norm.* -- exactly the parameters
of `timm.create_model(name, num_classes=0)`, so the file loads with strict=True.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ..engine.checkpoint import load_checkpoint
from ..tokenizer import TokenSpec, as_pair
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
    if recipe.get("modalities"):
        raise InteropError(f"a joint checkpoint (modalities {', '.join(recipe['modalities'])}) has no single timm "
                           f"encoder; fine-tune or probe one modality with a downstream recipe (init.modality)")
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


def _meta_vit(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's model `name` built with `kwargs` on the meta device (shapes only, no memory, no init cost)."""
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0, **kwargs)
    except Exception as err:  # timm raises TypeError/AssertionError/RuntimeError for arguments a model refuses
        raise InteropError(f"timm.create_model({name!r}, num_classes=0{args}) fails: {type(err).__name__}: "
                           f"{err}") from None
    if not isinstance(model, VisionTransformer):
        raise InteropError(f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer; pass a ViT "
                           f"name such as vit_base_patch16_224")
    return model


def _architecture(model: VisionTransformer) -> dict[str, Any]:
    """A built timm ViT's values of the `timm_kwargs` arguments, sizes as (height, width) pairs."""
    fc1 = model.blocks[0].mlp.fc1
    return {"img_size": as_pair(model.patch_embed.img_size), "patch_size": as_pair(model.patch_embed.patch_size),
            "in_chans": model.patch_embed.proj.weight.shape[1], "embed_dim": model.embed_dim,
            "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
            "mlp_ratio": fc1.out_features / fc1.in_features}


def timm_arguments(name: str, weights: dict[str, Tensor], spec: TokenSpec, heads: int) -> dict[str, Any]:
    """The architecture keyword arguments `timm.create_model(name, num_classes=0, ...)` needs to build exactly
    this encoder: those of `timm_kwargs` that differ from the model's defaults ({} for a standard ViT). The
    model built with them must have the exported parameters, name for name and shape for shape (checked)."""
    wanted = timm_kwargs(weights, spec, heads)
    default = _architecture(_meta_vit(name, {}))
    canonical = lambda key, value: as_pair(value) if key in ("img_size", "patch_size") else value  # noqa: E731
    needed = {k: v for k, v in wanted.items() if canonical(k, v) != default[k]}
    expected = {k: tuple(v.shape) for k, v in _meta_vit(name, needed).state_dict().items()}
    exported = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != exported:
        different = sorted(k for k in expected.keys() | exported.keys() if expected.get(k) != exported.get(k))
        raise InteropError(f"timm model {name!r} built with {needed or 'its defaults'} does not hold this encoder: "
                           f"{len(different)} parameters differ in name or shape, e.g. {different[:3]}; pass a "
                           f"plain ViT name such as vit_base_patch16_224")
    return needed


@dataclass(frozen=True)
class TimmExport:
    """An exported encoder: the file, the timm model name and the architecture arguments it needs."""

    path: Path
    name: str
    kwargs: dict[str, Any]  # architecture arguments that differ from the model's defaults (timm_arguments)
    heads_known: bool = True  # False for reference weights: num_heads is inferred, the weights do not store it

    def create_model_call(self) -> str:
        """A `timm.create_model(...)` expression that builds this encoder and loads the file."""
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return (f"timm.create_model({self.name!r}, pretrained=True, num_classes=0{args}, "
                f"pretrained_cfg_overlay={{'file': {str(self.path)!r}}})")


def export_encoder(checkpoint_path: str | Path, output_path: str | Path,
                   timm_name: str | None = None) -> TimmExport:
    """maeframe checkpoint or reference MAE .pth -> timm ViT safetensors. Returns the file, the timm name
    and the architecture arguments that make `timm.create_model(name, ...)` match the encoder."""
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
    kwargs = timm_arguments(timm_name, weights, spec, heads)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        save_file(weights, tmp, metadata={"format": "pt", "timm_name": timm_name, "source": source.name})
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return TimmExport(output, timm_name, kwargs, heads_known=state is not None)
