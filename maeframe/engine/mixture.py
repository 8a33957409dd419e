"""Alternate mixing of a joint recipe: every optimizer step trains one modality, drawn by weight.

The draw of step s is a function of (recipe seed, s) alone (`stream_seed`), so every process draws the same
modality and a resumed run the same sequence. Each modality keeps its own data order, as a single-modality
run would: its n-th batch (counting only the steps that drew it) is batch n mod E_m of its own epoch
n div E_m, where E_m is its global batches per pass; permutations and augmentation seeds are functions of
(seed, modality, its epoch, position). A resume at step s replays the s draws to find each modality's
position (a few µs per step; cached while a run goes on). An epoch of the mixture is as many steps as one
pass over every modality's data takes together (omnivision's ConcatDataset `max_steps: sum`).
"""
from __future__ import annotations

import bisect
from itertools import accumulate

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import MaeframeError, RecipeError
from .data import MIXTURE_STREAM, SeededDataset, sample_seed, stream_seed


class MixtureDataset(Dataset):
    """The modalities' training datasets side by side. Items are (modality index, dataset index, seed) ->
    ({modality name: sample}, label, failed reads), each read through `SeededDataset` (unreadable samples are
    replaced within their own modality)."""

    device_transform = None  # refused per modality at construction
    repeats = 1

    def __init__(self, datasets: dict[str, Dataset]):
        for name, dataset in datasets.items():
            if dataset.device_transform is not None:
                raise MaeframeError(f"modalities.{name}.data.train: dataset {type(dataset).__name__} augments its "
                                    f"batches on the device, which joint recipes do not support")
        self.names = list(datasets)
        self.datasets = datasets
        self.seeded = [SeededDataset(d) for d in datasets.values()]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def unreadable(self) -> list[str]:
        return [f"{name}: {what}" for name, d in self.datasets.items() for what in d.unreadable()]

    def __getitem__(self, item: tuple[int, int, int]):
        modality, index, seed = item
        sample, label, failed = self.seeded[modality][(index, seed)]
        return {self.names[modality]: sample}, label, failed


class MixtureBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields this rank's part of each global micro-batch as (modality, dataset index, seed) triples; all
    `accum` micro-batches of a step come from the step's modality. `start(epoch, batch)` positions it."""

    repeats = 1  # samples per item (repeated sampling is refused in joint recipes)

    def __init__(self, lengths: dict[str, int], weights: dict[str, float], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, accum: int = 1):
        self.seed, self.items, self.rank, self.world_size, self.accum = seed, batch_size, rank, world_size, accum
        self.names = list(lengths)
        self.lengths = [lengths[n] for n in self.names]
        total = sum(weights[n] for n in self.names)
        self.bounds = list(accumulate(weights[n] / total for n in self.names))[:-1]
        global_batch = batch_size * world_size
        self.own_batches = [length // global_batch for length in self.lengths]  # global batches per own pass
        for name, length, batches in zip(self.names, self.lengths, self.own_batches):
            if batches == 0:
                raise RecipeError([("data.batch_size", f"modalities.{name}.data.train holds {length} samples: no "
                                                       f"full batch of {batch_size} × {world_size} processes")])
        self.steps_per_epoch = max(sum(self.own_batches) // accum, 1)
        self.batches_per_epoch = self.steps_per_epoch * accum
        self.epoch, self.first_batch = 0, 0
        self._known = (0, [0] * len(self.names))  # (step, draws of each modality before it)
        self._orders: dict[int, tuple[int, list[int]]] = {}

    def choice(self, step: int) -> int:
        """The modality (index) that step `step` trains: a function of (seed, step)."""
        u = stream_seed(self.seed, step, 0, MIXTURE_STREAM) / (2**63 - 1)
        return bisect.bisect_right(self.bounds, u)

    def draws_before(self, step: int) -> list[int]:
        """How many of the steps before `step` trained each modality."""
        known, counts = self._known if self._known[0] <= step else (0, [0] * len(self.names))
        counts = list(counts)
        for s in range(known, step):
            counts[self.choice(s)] += 1
        self._known = (step, counts)
        return list(counts)

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def _order(self, modality: int, epoch: int) -> list[int]:
        cached = self._orders.get(modality)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(sample_seed(self._seed(modality), epoch, -1))
            cached = (epoch, torch.randperm(self.lengths[modality], generator=generator).tolist())
            self._orders[modality] = cached
        return cached[1]

    def _seed(self, modality: int) -> int:
        return sample_seed(self.seed, -3, modality)  # each modality its own data order

    def __iter__(self):
        first_step = self.epoch * self.steps_per_epoch + self.first_batch // self.accum
        counts = self.draws_before(first_step)
        global_batch = self.items * self.world_size
        for b in range(self.first_batch, self.batches_per_epoch):
            step, micro = self.epoch * self.steps_per_epoch + b // self.accum, b % self.accum
            m = self.choice(step)
            n = counts[m] * self.accum + micro  # this modality's global micro-batch index
            own_epoch, own_batch = divmod(n, self.own_batches[m])
            order = self._order(m, own_epoch)
            first = own_batch * global_batch + self.rank * self.items
            seed = self._seed(m)
            yield [(m, order[p], sample_seed(seed, own_epoch, p)) for p in range(first, first + self.items)]
            if micro == self.accum - 1:
                counts[m] += 1
                self._known = (step + 1, list(counts))
