"""Pretrained encoder weights for downstream recipes (`init`), through the recipe's `WeightFormat`
(`init.format`, a plugin: maeframe checkpoints, official MAE / VideoMAE / AudioMAE weights are built-in
ones). Position embeddings are fixed buffers rebuilt from the recipe's token grid (or the format's own
table), so an encoder pretrained at one resolution loads at another with the same patch size."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import RecipeError
from ..model.joint_weights import modality_encoder_state, pick_modality
from ..recipe import EncoderConfig, InitConfig
from ..tokenizer import TokenSpec
from ..weights import EncoderLayout, WeightFormat
from .official_mae import InteropError


def pretrained_encoder_state(fmt: WeightFormat, init: InitConfig, spec: TokenSpec, model: EncoderConfig | None = None,
                             tokenizer_options: dict | None = None, tokenizer_name: str | None = None) -> dict[str, Tensor]:
    """The `encoder.*` tensors of `init.checkpoint`, read by the recipe's weight format `fmt`. A joint checkpoint's
    encoder is seen as one modality's (`init.modality`, else the modality whose tokenizer is `tokenizer_name`
    with `tokenizer_options`): its patch embedding and blocks, then the shared blocks."""
    path = Path(init.checkpoint)
    if not (path.is_file() or (fmt.reads_directories and path.is_dir())):  # a dir: fsdp's sharded last.dcp
        hint = " (pretrain first, e.g. `maeframe run recipes/quickstart.yaml`)" if init.format == "maeframe" else ""
        raise FileNotFoundError(f"init.checkpoint {str(path)!r} does not exist{hint}")
    weights = fmt.read(path, spec, model, tokenizer_options or {})
    if init.modality is not None or any(k.startswith("encoder.modalities.") for k in weights):
        recipe = fmt.trained_recipe(path) or {}
        if not recipe.get("modalities"):
            raise RecipeError([("init.modality", f"{path} holds a single-modality encoder; remove init.modality "
                                                 f"(it picks a modality of a joint checkpoint)")])
        tokenizer = {"name": tokenizer_name, "options": tokenizer_options}
        try:
            modality = pick_modality(recipe, init.modality, tokenizer, str(path))
        except ValueError as err:
            raise RecipeError([("init.modality", str(err).partition(": ")[2])]) from None
        weights = modality_encoder_state(weights, modality, recipe["model"]["modality_blocks"])
    return {k: v for k, v in weights.items() if k.startswith("encoder.")}


def encoder_layout(fmt: WeightFormat | None) -> EncoderLayout:
    """The layout the encoder needs for the weights of `fmt` (maeframe's for `init.format: none`)."""
    return fmt.layout if fmt is not None else EncoderLayout()


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
