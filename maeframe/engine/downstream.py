"""What the downstream protocols (finetune, linprobe, knn) share: pretrained encoder weights, class names and
the (sharded) evaluation pass.

Encoder weights come from `init`:
    maeframe      a maeframe checkpoint (runs/NAME/last.pt of pretraining, or of a downstream run): its
                  "model" entry's `encoder.*` tensors;
    official_mae  reference MAE weights (`mae_pretrain_vit_base.pth`, ...), converted by maeframe.interop;
    official_videomae / official_audiomae
                  reference VideoMAE / AudioMAE weights (pretraining or fine-tuned), converted by
                  maeframe.interop.official_av; a VideoMAE encoder runs with layout "videomae";
    none          random initialisation (the baseline).
Position embeddings are fixed sin-cos buffers rebuilt from the recipe's token grid, so an encoder
pretrained at one resolution loads at another with the same patch size.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..build import Prepared, build_dataset
from ..errors import MaeframeError, RecipeError
from ..interop.official_av import audiomae_to_maeframe, read_reference, videomae_to_maeframe
from ..interop.official_mae import InteropError, official_to_maeframe, read_official
from ..recipe import EncoderConfig, HeadConfig, InitConfig
from ..tokenizer import TokenSpec, Tokenizer
from .checkpoint import load_checkpoint
from .distributed import World, map_dataset

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


def train_set_without_device_transform(prepared: Prepared) -> Dataset:
    """The augmented training set of a downstream recipe. Datasets whose training batches are finished on the
    device (`device_transform`, e.g. `packed`: uint8 images cropped on the GPU) serve pretraining only."""
    dataset = build_dataset(prepared, "train")
    if dataset.device_transform is not None:
        raise RecipeError([("data.train", f"dataset {prepared.recipe.data.train.name!r} augments its batches on the "
                                          f"device, which only pretraining does; fine-tune and probe from the "
                                          f"source images (e.g. image_folder)")])
    return dataset


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


def dataset_classes(head: HeadConfig | None, dataset: Dataset, labels: Tensor | None = None) -> list[str]:
    """Class names: the dataset's `classes`, else "0".."C-1" for head.num_classes or the labels seen."""
    names = dataset.classes
    count = head.num_classes if head is not None and head.num_classes else None
    if names is not None and (count is None or count == len(names)):
        return [str(n) for n in names]
    if count is None and labels is not None:
        count = int(labels.max()) + 1 if labels.dim() == 1 else labels.shape[1]
    if count is None:
        raise MaeframeError(f"head.num_classes: {type(dataset).__name__} has no `classes`; set the class count")
    return [str(i) for i in range(count)]


def eval_label_map(train_set: Dataset, eval_set: Dataset, field: str = "data.eval") -> Tensor | None:
    """Eval label index -> training label index, matched by class name (None when the eval set numbers its
    classes as the training set does, or either names none). Each folder dataset numbers its own
    sub-folders, so an eval folder with a subset of the classes would otherwise shift every label. An eval
    class the training set does not have is an error naming it."""
    names, train = eval_set.classes, train_set.classes
    if names is None or train is None:
        return None
    train_classes = [str(n) for n in train]
    if [str(n) for n in names] == train_classes:
        return None
    unknown = [str(n) for n in names if str(n) not in train_classes]
    if unknown:
        raise MaeframeError(f"{field}: classes {unknown[:10]} are not among the training set's {len(train_classes)} "
                            f"classes ({', '.join(train_classes[:10])}{', ...' if len(train_classes) > 10 else ''}); "
                            f"evaluate on the classes the model was trained on")
    return torch.tensor([train_classes.index(str(n)) for n in names])


def relabel(labels: Tensor, mapping: Tensor | None, num_classes: int) -> Tensor:
    """Labels in the eval set's numbering -> the training set's: class indices [N] through `mapping`, or
    multi-hot [N, C_eval] scattered into [N, num_classes] columns."""
    if mapping is None:
        return labels
    if labels.dim() == 1:
        return mapping[labels]
    out = labels.new_zeros(len(labels), num_classes)
    out[:, mapping] = labels
    return out


def dataset_views(dataset: Dataset) -> int:
    """Views per evaluation sample: a dataset with `views` = V > 1 yields [V, *input_shape] per sample
    (e.g. video clips × spatial crops); 1 otherwise."""
    views = int(dataset.views)
    if views < 1:
        raise MaeframeError(f"{type(dataset).__name__}.views is {views}; it must be at least 1")
    return views


def merge_views(logits: Tensor, multi_label: bool = False) -> Tensor:
    """logits [B, V, C] of V views per sample -> scores [B, C]: the mean of the views' probabilities
    (softmax, or sigmoid when multi-label), as VideoMAE averages softmax scores over its test views,
    returned as log-probabilities (single-label) or logits (multi-label) so that cross-entropy, top-k and
    AP apply unchanged. One view passes its logits through as they are."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    if multi_label:
        return torch.logit(logits.sigmoid().mean(1), eps=1e-7)
    return logits.softmax(-1).mean(1).log()


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Tokenizer, dataset: Dataset, device: torch.device,
            batch_size: int, autocast=None, num_workers: int = 0, multi_label: bool = False,
            world: World = World()) -> tuple[Tensor, Tensor]:
    """(scores [N, C] float32 on CPU, labels) of `model` over the whole `dataset` in order, in eval mode.
    Under torchrun each rank scores its share and every rank gets all rows (`map_dataset`).

    A multi-view dataset (`dataset_views` V > 1) yields batches [B, V, *input_shape]: the loader takes
    batch_size // V samples at a time, the views go through the model in chunks of at most `batch_size`
    inputs, and `merge_views` averages their probabilities per sample."""
    was_training = model.training
    model.eval()
    views = dataset_views(dataset)

    def scores(batch: Tensor) -> Tensor:
        if views > 1 and tuple(batch.shape[1:]) != (views, *tokenizer.input_shape):
            raise MaeframeError(f"{type(dataset).__name__} has {views} views per sample, so its batches must be "
                                f"[B, {views}, {', '.join(map(str, tokenizer.input_shape))}]; got {list(batch.shape)}")
        inputs = batch.flatten(0, 1) if views > 1 else batch            # [B·V, *input_shape]
        logits = []
        for chunk in inputs.split(batch_size):
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits.append(model(tokenizer.tokenize(chunk.to(device, non_blocking=True)).patches).float().cpu())
        return merge_views(torch.cat(logits).view(len(batch), views, -1), multi_label)

    out = map_dataset(scores, dataset, world, max(1, batch_size // views), num_workers)
    model.train(was_training)
    return out
