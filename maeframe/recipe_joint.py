"""The joint part of a pretraining recipe: several modalities trained by one model (OmniMAE, CAV-MAE).

A joint recipe replaces the top-level `tokenizer`, `masker`, `target` and `losses` with
`modalities: {name: ModalityConfig}` (each modality names its own four) and says how the modalities meet
(`mixing`):

* alternate: every optimizer step trains one modality, drawn by `weight` from a stream seeded by
  (recipe seed, step): the same draw on every process and after a resume. Each modality names its own data
  (`modalities.<name>.data`); the top-level `data` keeps the loader settings (batch_size, num_workers, ...).
  OmniMAE's choice (omnivision's ConcatDataset, batching strategy "use_one": a batch holds one dataset).
* paired: every sample holds all modalities (CAV-MAE's audio + frames), read from ONE dataset named in the
  top-level `data.train` / `data.eval` whose items are ({modality name: tensor}, label) (`Dataset.paired`).
  Tokens of all modalities meet in the shared encoder blocks, and `joint_losses` (`CrossModalLoss`) compare
  the modalities of each sample.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from .recipe_base import ComponentRef, LossRef, Strict

MODALITY_NAME = r"^[a-z][a-z0-9_]*$"  # used in metric keys (loss/<name>/mse) and picture folders
SINGLE_FIELDS = ("tokenizer", "masker", "target", "losses")
# top-level fields that recipe-level checks name in their messages (`recipe._problems` maps them to paths)
JOINT_FIELDS = (*SINGLE_FIELDS, "modalities", "mixing", "joint_losses", "monitor")


class ModalityData(Strict):
    """A modality's own datasets (mixing: alternate)."""

    train: ComponentRef = Field(description="training dataset of this modality")
    eval: ComponentRef | None = Field(None, description="held-out dataset for this modality's pictures (default: its "
                                                        "training data without augmentation)")


class ModalityConfig(Strict):
    """One modality of a joint recipe: its own tokenizer, masker, target and losses (as the top-level ones of a
    single-modality recipe), its data (alternate mixing) and its share of the steps."""

    tokenizer: ComponentRef = Field(description="turns this modality's samples into patches; fixes its token grid")
    masker: ComponentRef = Field(description="chooses this modality's hidden tokens (e.g. OmniMAE: ratio 0.9 for "
                                             "images, 0.95 for video)")
    target: ComponentRef = Field(description="what the decoder predicts for this modality's tokens")
    losses: list[LossRef] = Field(min_length=1, description="weighted loss terms of this modality, summed; logged as "
                                                            "loss/<modality>/<name>")
    data: ModalityData | None = Field(None, description="this modality's datasets (mixing: alternate); absent in "
                                                        "paired mixing, where data.train yields all modalities")
    weight: float = Field(1.0, gt=0, description="mixing: alternate: relative chance that a step trains this "
                                                 "modality (weights are normalised over the modalities); paired: "
                                                 "unused, leave it at 1")


def _refused(field: str, why: str) -> ValueError:
    return ValueError(f"{field}: {why}")


def check_joint(recipe: Any) -> None:
    """The cross-field rules of single-modality and joint pretraining recipes; raises ValueError("field.path:
    message") for the first broken one."""
    model = recipe.model
    if recipe.modalities is None:
        for field in SINGLE_FIELDS:
            if getattr(recipe, field) is None:
                raise _refused(field, "required: a pretraining recipe names its tokenizer, masker, target and "
                                      "losses, or gives `modalities` (a joint recipe) with those per modality")
        if recipe.data.train is None:
            raise _refused("data.train", "required: the training dataset (data.train.name)")
        for field, value in (("mixing", recipe.mixing), ("joint_losses", recipe.joint_losses)):
            if value is not None:
                raise _refused(field, "only a joint recipe (one with `modalities`) mixes modalities; remove it")
        for field, default in (("modality_blocks", 0), ("shared_patch_embed", False), ("pooled_latent", "none")):
            if getattr(model, field) != default:
                raise _refused(f"model.{field}", "only a joint recipe (one with `modalities`) has per-modality "
                                                 "parts; remove it")
        return
    for field in SINGLE_FIELDS:
        if getattr(recipe, field) is not None:
            raise _refused(field, f"a recipe with `modalities` gives each modality its own {field} "
                                  f"(modalities.<name>.{field}); remove the top-level {field}")
    if len(recipe.modalities) < 2:
        raise _refused("modalities", f"a joint recipe mixes at least two modalities (got "
                                     f"{len(recipe.modalities)}); a single one is an ordinary recipe")
    if recipe.mixing is None:
        raise _refused("mixing", "required with modalities: alternate (each step trains one modality, drawn by "
                                 "weight) or paired (each sample holds every modality)")
    if model.modality_blocks >= model.depth:
        raise _refused("model.modality_blocks", f"{model.modality_blocks} per-modality blocks leave none of the "
                                                f"model.depth {model.depth} encoder blocks shared")
    if model.decoder_attention != "global":
        raise _refused("model.decoder_attention", "the joint decoder attends over the tokens of several grids at "
                                                  "once; local windows need one 2-D grid (use global)")
    if recipe.monitor is not None and recipe.mixing == "paired":
        raise _refused("monitor", "the online k-NN monitor follows each modality's own data (mixing: alternate); "
                                  "with paired mixing set monitor: null and run a knn recipe on the checkpoint "
                                  "(init.modality picks the modality)")
    if recipe.mixing == "alternate":
        _check_alternate(recipe)
    else:
        _check_paired(recipe)


def _check_alternate(recipe: Any) -> None:
    for name, modality in recipe.modalities.items():
        if modality.data is None:
            raise _refused(f"modalities.{name}.data", "required with mixing: alternate: each modality names its "
                                                      "own training data (data.train)")
    for split in ("train", "eval"):
        if getattr(recipe.data, split) is not None:
            raise _refused(f"data.{split}", "with mixing: alternate each modality names its own datasets "
                                            "(modalities.<name>.data); the top-level data keeps the loader "
                                            "settings only")
    if recipe.joint_losses:
        raise _refused("joint_losses", "cross-modal losses compare the modalities of one sample, so they need "
                                       "mixing: paired (with alternate mixing a step holds one modality)")
    if recipe.model.pooled_latent != "none":
        raise _refused("model.pooled_latent", "pooled latents feed cross-modal losses, which need mixing: paired")


def _check_paired(recipe: Any) -> None:
    if recipe.data.train is None:
        raise _refused("data.train", "required with mixing: paired: one dataset whose samples hold every "
                                     "modality ({modality: tensor})")
    for name, modality in recipe.modalities.items():
        if modality.data is not None:
            raise _refused(f"modalities.{name}.data", "with mixing: paired the samples of every modality come "
                                                      "from data.train / data.eval; remove it")
        if modality.weight != 1.0:
            raise _refused(f"modalities.{name}.weight", "with mixing: paired every step holds every modality; "
                                                        "leave weight at 1")
    if recipe.model.shared_patch_embed:
        raise _refused("model.shared_patch_embed", "paired modalities are told apart by their own patch "
                                                   "embeddings; share them only with mixing: alternate")


def joint_refs(recipe: Any) -> list[tuple[str, str, ComponentRef]]:
    """(field path, kind, ref) of every component a joint recipe names per modality, then its joint losses."""
    refs: list[tuple[str, str, ComponentRef]] = []
    for name, modality in (getattr(recipe, "modalities", None) or {}).items():
        prefix = f"modalities.{name}"
        refs += [(f"{prefix}.{kind}", kind, getattr(modality, kind)) for kind in ("tokenizer", "masker", "target")]
        if modality.data is not None:
            refs.append((f"{prefix}.data.train", "dataset", modality.data.train))
            if modality.data.eval is not None:
                refs.append((f"{prefix}.data.eval", "dataset", modality.data.eval))
        refs += [(f"{prefix}.losses.{i}", "loss", ref) for i, ref in enumerate(modality.losses)]
    refs += [(f"joint_losses.{i}", "loss", ref) for i, ref in enumerate(getattr(recipe, "joint_losses", None) or [])]
    return refs
