"""The built-in weight formats of `init.format`: maeframe checkpoints and the reference MAE, VideoMAE and
AudioMAE weights, registered through `register_weight_formats` as any third-party format would be."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from maeframe import EncoderLayout, WeightFormat, hookimpl
from maeframe.interop import InteropError, load_checkpoint, official_to_maeframe, read_official

from .official_av import audiomae_to_maeframe, read_reference, videomae_positions, videomae_to_maeframe

ARCHITECTURE = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def check_recorded_architecture(recipe: dict[str, Any], path: Path, model: EncoderConfig | None,
                                 tokenizer_options: dict | None) -> None:
    """num_heads is not visible in the weights' shapes, so compare with what the checkpoint's run recorded."""
    recorded = recipe.get("model", {})
    problems = [f"model.{key}: the checkpoint's encoder has {recorded[key]!r}, the recipe {getattr(model, key)!r}"
                for key in ARCHITECTURE if model is not None and key in recorded and recorded[key] != getattr(model, key)]
    theirs = (recipe.get("tokenizer") or {}).get("options", {})  # a joint recipe's tokenizers are per modality
    for key in ("patch_size", "channels"):
        if tokenizer_options and key in theirs and key in tokenizer_options and theirs[key] != tokenizer_options[key]:
            problems.append(f"tokenizer.options.{key}: the checkpoint was pretrained with {theirs[key]!r}, "
                            f"the recipe has {tokenizer_options[key]!r}")
    if problems:
        raise InteropError(f"{path}: " + "; ".join(problems))


class MaeframeWeights(WeightFormat):
    """A maeframe checkpoint (runs/NAME/last.pt of pretraining or of a downstream run, or an fsdp run's
    last.dcp/): its "model" entry's `encoder.*` tensors; the architecture it recorded must match the recipe."""

    reads_directories = True

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            raise InteropError(f"init.checkpoint: {err}; for reference weights set init.format: official_mae") from None
        check_recorded_architecture(state.get("recipe", {}), path, model, tokenizer_options)
        return state["model"]

    def trained_recipe(self, path: Path) -> dict[str, Any] | None:
        return load_checkpoint(path).get("recipe")


class OfficialMAEWeights(WeightFormat):
    """Reference MAE weights (`mae_pretrain_vit_base.pth`, or a fine-tuned one: its classifier is ignored)."""

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        raw = read_official(path)
        raw = {k: v for k, v in raw.items() if not k.startswith(("head.", "fc_norm."))}
        rows = raw["pos_embed"].shape[1] - 1 if "pos_embed" in raw else None
        try:
            weights, _ = official_to_maeframe(raw, spec.grid if rows == math.prod(spec.grid) else None)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None
        return weights


class OfficialVideoMAEWeights(WeightFormat):
    """Reference VideoMAE weights (pretraining or fine-tuned): an encoder without cls token whose positions
    are VideoMAE's 1-D sinusoid table over the token index."""

    @property
    def layout(self) -> EncoderLayout:
        return EncoderLayout(cls_token=False, positions=videomae_positions)

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            return videomae_to_maeframe(read_reference(path), spec.num_tokens)
        except InteropError as err:
            raise InteropError(f"init.checkpoint {path}: {err}") from None


class OfficialAudioMAEWeights(WeightFormat):
    """Reference AudioMAE weights (pretraining or fine-tuned) on the recipe's (time, frequency) grid."""

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            return audiomae_to_maeframe(read_reference(path), spec.grid)
        except InteropError as err:
            raise InteropError(f"init.checkpoint {path}: {err}") from None


@hookimpl
def register_weight_formats(register):
    register("maeframe", MaeframeWeights)
    register("official_mae", OfficialMAEWeights)
    register("official_videomae", OfficialVideoMAEWeights)
    register("official_audiomae", OfficialAudioMAEWeights)
