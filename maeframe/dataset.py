"""Datasets are components and torch datasets at once: they yield (sample, label) pairs."""
from __future__ import annotations

from abc import abstractmethod
from typing import Callable

import torch
from torch import Tensor

from .component import Component, Options


class Dataset(Component, torch.utils.data.Dataset):
    """Yields (sample [*input_shape] float tensor, label int) pairs.

    `input_shape` comes from the tokenizer, so a dataset resizes and crops to what the model expects.
    `train` selects the augmented training pipeline versus the deterministic evaluation one.
    """

    kind = "dataset"
    # Optional batched augmentation the engine applies after the batch reaches the device:
    # `device_transform(batch [B, ...] as collated, generator on the batch's device, rows=(start, total))
    # -> [B, *input_shape]`. Its randomness must come only from `generator`, which the engine seeds from
    # (recipe seed, step, micro-batch) alike on every process: draw for all `total` images of the global
    # micro-batch and use rows start..start+B (this process's slice), so N processes augment as one process
    # with an N× batch and a resumed run draws the same. None: samples are ready as loaded.
    device_transform: Callable[..., Tensor] | None = None

    def __init__(self, options: Options, input_shape: tuple[int, ...], train: bool):
        Component.__init__(self, options)
        self.input_shape = input_shape
        self.train = train

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    @classmethod
    def item_repeats(cls, options: Options) -> int:
        """Repeated sampling (VideoMAE v2's num_sample, MAE-ST's repeated augmentation): how many samples one
        training item holds under these options (default 1). With k > 1 an item is one read of a source (one
        decoded video or recording) giving k independently augmented samples, all drawn from the item's seed:
        `__getitem__` -> ([k, *input_shape], label). The engine's loader then takes data.batch_size / k items
        per batch (validation requires data.batch_size to be a multiple of k) and flattens them into
        data.batch_size samples, each label repeated for its k samples. A class method, so recipes are checked
        before any data is read."""
        return 1

    @property
    def repeats(self) -> int:
        """Samples per item as this dataset loads them: `item_repeats(options)` for training, 1 for evaluation."""
        return type(self).item_repeats(self.options) if self.train else 1

    def describe(self, index: int) -> str:
        """Where sample `index` comes from (a file path), for messages about unreadable samples."""
        return f"sample {index}"

    def denormalize(self, batch: Tensor) -> Tensor:
        """Undo input normalisation for display: [B, *input_shape] -> values in [0, 1]."""
        return batch
