"""Datasets are components and torch datasets at once: they yield (sample, label) pairs."""
from __future__ import annotations

from abc import abstractmethod
from typing import Callable, ClassVar

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
    # Class names in label order (label i is classes[i]), or None for unlabelled data or bare indices. The
    # engine aligns an eval set's labels to the training set's classes by these names.
    classes: list[str] | None = None
    # True for a dataset whose samples hold several modalities at once (a joint recipe's `mixing: paired`, e.g.
    # audio + frames of one clip): it is constructed with `input_shape` = {modality name: shape}, one entry per
    # modality of the recipe, and `__getitem__` returns ({modality name: tensor [*shape]}, label). The engine
    # refuses a dataset that is not paired in a paired recipe, and a paired one elsewhere.
    paired: ClassVar[bool] = False

    def __init__(self, options: Options, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]], train: bool):
        Component.__init__(self, options)
        self.input_shape = input_shape
        self.train = train

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """(sample [*input_shape], label); a `paired` dataset: ({modality: [*input_shape[modality]]}, label)."""

    @property
    def views(self) -> int:
        """Test views per evaluation sample (e.g. video clips × spatial crops). With V > 1 an evaluation item is
        [V, *input_shape] and the engine averages the views' probabilities per sample. Default 1."""
        return 1

    @property
    def view_layout(self) -> dict[str, int]:
        """How the `views` are made, for results.json (e.g. {"clips": 5, "crops": 3}). Default: nothing."""
        return {}

    def use_finetune_augment(self, rand_augment: str | None, random_erasing: float) -> None:
        """Fine-tuning asks the training set to add RandAugment (a timm spec) and random erasing (a
        probability) to its per-sample pipeline, drawn from the per-sample seeded generators. A dataset that
        cannot (the default) is refused with an error naming `augment.rand_augment` / `augment.random_erasing`."""
        raise ValueError(f"{type(self).__name__} applies no RandAugment or random erasing; set "
                         f"augment.rand_augment: null and augment.random_erasing: 0")

    def unreadable(self) -> list[str]:
        """Files passed over while the dataset was built because they cannot be read (e.g. a failed header
        check), each with why. The engine counts them as failed reads under `data.max_bad_fraction` (with
        the reads that fail later) and reports them in metrics.jsonl and run.json. Default: none."""
        return []

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
