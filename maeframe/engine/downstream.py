"""What the downstream protocols (finetune, linprobe, knn) share: class names and their alignment, test
views, and the (sharded) evaluation pass. Encoder weights come from `maeframe.interop.encoder_weights`."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..build import Prepared, build_dataset
from ..errors import MaeframeError, RecipeError
from ..recipe import HeadConfig
from ..tokenizer import Tokenizer
from .distributed import World, map_dataset

def train_set_without_device_transform(prepared: Prepared) -> Dataset:
    """The augmented training set of a downstream recipe. Datasets whose training batches are finished on the
    device (`device_transform`, e.g. `packed`: uint8 images cropped on the GPU) serve pretraining only."""
    dataset = build_dataset(prepared, "train")
    if dataset.device_transform is not None:
        raise RecipeError([("data.train", f"dataset {prepared.recipe.data.train.name!r} augments its batches on the "
                                          f"device, which only pretraining does; fine-tune and probe from the "
                                          f"source images (e.g. image_folder)")])
    return dataset


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
