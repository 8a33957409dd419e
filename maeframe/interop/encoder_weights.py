"""Pretrained encoder weights for downstream recipes (`init`), in maeframe's names and layout.

Encoder weights come from `init`:
    maeframe      a maeframe checkpoint (runs/NAME/last.pt of pretraining, or of a downstream run, or an fsdp
                  run's last.dcp/): its "model" entry's `encoder.*` tensors;
    official_mae  reference MAE weights (`mae_pretrain_vit_base.pth`, ...), converted by maeframe.interop;
    official_videomae / official_audiomae
                  reference VideoMAE / AudioMAE weights (pretraining or fine-tuned), converted by
                  maeframe.interop.official_av; a VideoMAE encoder runs with layout "videomae";
    none          random initialisation (the baseline).
Position embeddings are fixed sin-cos buffers rebuilt from the recipe's token grid, so an encoder
pretrained at one resolution loads at another with the same patch size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engine.checkpoint import load_checkpoint
from ..recipe import EncoderConfig, InitConfig
from ..tokenizer import TokenSpec
from .official_av import audiomae_to_maeframe, read_reference, videomae_to_maeframe
from .official_mae import InteropError, official_to_maeframe, read_official

ARCHITECTURE = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def pretrained_encoder_state(init: InitConfig, spec: TokenSpec, model: EncoderConfig | None = None,
                             tokenizer_options: dict | None = None) -> dict[str, Tensor]:
    """The `encoder.*` tensors named by `init` (maeframe names and layout). With a maeframe checkpoint,
    its recorded encoder architecture and patch size must match `model` / `tokenizer_options`."""
    path = Path(init.checkpoint)
    if not (path.is_file() or (init.format == "maeframe" and path.is_dir())):  # a dir: fsdp's sharded last.dcp
        hint = " (pretrain first, e.g. `maeframe run recipes/quickstart.yaml`)" if init.format == "maeframe" else ""
        raise FileNotFoundError(f"init.checkpoint {str(path)!r} does not exist{hint}")
    if init.format in ("official_videomae", "official_audiomae"):
        raw = read_reference(path)
        try:
            if init.format == "official_videomae":
                return videomae_to_maeframe(raw, spec.num_tokens)
            return audiomae_to_maeframe(raw, spec.grid)
        except InteropError as err:
            raise InteropError(f"init.checkpoint {path}: {err}") from None
    if init.format == "maeframe":
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            raise InteropError(f"init.checkpoint: {err}; for reference weights set init.format: official_mae") from None
        _check_recorded_architecture(state.get("recipe", {}), path, model, tokenizer_options)
        weights = state["model"]
    else:
        raw = read_official(path)
        # a reference fine-tuned checkpoint also holds its classifier: only the encoder is used
        raw = {k: v for k, v in raw.items() if not k.startswith(("head.", "fc_norm."))}
        rows = raw["pos_embed"].shape[1] - 1 if "pos_embed" in raw else None
        try:
            weights, _ = official_to_maeframe(raw, spec.grid if rows == math.prod(spec.grid) else None)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None
    return {k: v for k, v in weights.items() if k.startswith("encoder.")}


def encoder_layout(init: InitConfig) -> str:
    """The encoder layout the weights of `init` need: "videomae" (no cls token, VideoMAE's 1-D sinusoid
    positions) for official VideoMAE weights, else "maeframe"."""
    return "videomae" if init.format == "official_videomae" else "maeframe"


def _check_recorded_architecture(recipe: dict[str, Any], path: Path, model: EncoderConfig | None,
                                 tokenizer_options: dict | None) -> None:
    """num_heads is not visible in the weights' shapes, so compare with what the checkpoint's run recorded."""
    recorded = recipe.get("model", {})
    problems = [f"model.{key}: the checkpoint's encoder has {recorded[key]!r}, the recipe {getattr(model, key)!r}"
                for key in ARCHITECTURE if model is not None and key in recorded and recorded[key] != getattr(model, key)]
    theirs = recipe.get("tokenizer", {}).get("options", {})
    for key in ("patch_size", "channels"):
        if tokenizer_options and key in theirs and key in tokenizer_options and theirs[key] != tokenizer_options[key]:
            problems.append(f"tokenizer.options.{key}: the checkpoint was pretrained with {theirs[key]!r}, "
                            f"the recipe has {tokenizer_options[key]!r}")
    if problems:
        raise InteropError(f"{path}: " + "; ".join(problems))


def load_encoder(module: torch.nn.Module, weights: dict[str, Tensor], source: str) -> list[str]:
    """Copy `encoder.*` weights into `module` (which has an `encoder`); every encoder parameter must be
    covered with the right shape. Returns the checkpoint keys left unused (e.g. the final norm that
    average pooling replaces)."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith("encoder.")}
    missing = [k for k in own if k not in weights]
    mismatched = [f"{k}: checkpoint {list(weights[k].shape)} vs model {list(v.shape)}"
                  for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if missing or mismatched:
        detail = "; ".join(mismatched[:4]) + (f"; missing {missing[:6]}" if missing else "")
        raise InteropError(f"{source}: the encoder does not match the recipe's model/tokenizer "
                           f"(another size or patch size?): {detail}")
    module.load_state_dict({k: weights[k] for k in own}, strict=False)
    return [k for k in weights if k not in own]
