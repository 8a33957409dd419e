"""Resumable, deterministic data order: the same seed gives the same batches and the same augmentation
whatever the number of workers or processes, and a resumed run continues with the exact next batch.

A global batch is `batch_size × world_size` consecutive positions of the epoch's permutation; rank r
loads the r-th slice, so N processes see exactly the samples one process with an N× batch would. With
repeated sampling (a dataset's `repeats` k > 1) a position is an item of k samples: a batch is batch_size / k
positions, and the loader flattens their k samples, so seeds stay functions of (seed, epoch, position).
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..errors import RecipeError
from ..recipe import DataConfig

log = logging.getLogger("maeframe.data")
MAX_TRIES = 64  # reads of one item: its sample, then random replacements (at 50 % unreadable: 1 in 2**64 fail)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A distinct 63-bit seed for each (run seed, epoch, position in the epoch)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB)
    return mixed % (2**63 - 1)


DEVICE_AUGMENT_STREAM, DROP_PATH_STREAM, MIXUP_STREAM = 0, 1, 2  # per-step random streams, see stream_seed
MIXTURE_STREAM = 3  # a joint recipe's modality of each step (alternate mixing, engine/mixture.py)


def stream_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """The seed of one per-step random draw shared by every process: a function of (run seed, optimizer step,
    micro-batch, stream) alone, never of the rank, so N processes draw as one and a resume draws the same."""
    return sample_seed(seed, step, stream * 2**20 + micro)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's part of each global batch as (dataset index, augmentation seed) pairs; the
    permutation depends only on (seed, epoch). `start(epoch, batch)` positions it, e.g. after a resume.

    `batch_size` counts samples; with `repeats` k (the dataset's items hold k samples each) a batch is
    batch_size / k items, so an epoch (one pass over the items) has k× the steps of k = 1."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 batches_multiple: int = 1, repeats: int = 1):
        if batch_size % repeats:
            raise RecipeError([("data.batch_size", f"{batch_size} is not a multiple of the training data's "
                                                   f"repeats {repeats} (data.train.options.repeats): a batch holds "
                                                   f"whole items of {repeats} samples")])
        self.length, self.seed, self.repeats = length, seed, repeats
        self.items = batch_size // repeats  # dataset items per batch of this rank
        self.rank, self.world_size = rank, world_size
        global_batches = length // (self.items * world_size)
        self.batches_per_epoch = global_batches // batches_multiple * batches_multiple
        if self.batches_per_epoch == 0:
            items = f" ({self.items} items of {repeats} samples)" if repeats > 1 else ""
            raise RecipeError([("data.batch_size", f"the training set's {length} samples give no full batch of "
                                                   f"{batch_size}{items} (× {batches_multiple} accumulation steps "
                                                   f"× {world_size} processes)")])
        self.epoch, self.first_batch = 0, 0

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.length, generator=generator).tolist()
        global_batch = self.items * self.world_size
        for b in range(self.first_batch, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.items
            positions = range(first, first + self.items)
            yield [(order[p], sample_seed(self.seed, self.epoch, p)) for p in positions]


class SeededDataset(Dataset):
    """Runs the wrapped dataset's random augmentation under the given per-sample seed, without
    disturbing the caller's RNG (so masking draws in the main process are unaffected).

    A sample that fails to load (corrupt, truncated, empty, unreadable file) is logged with its path (once
    per loader process) and replaced by another sample drawn at random from the whole dataset (a function
    of the sample's seed, so exact on resume): a whole damaged folder, listed in one run of indices, costs
    one replacement per bad file, not a chain of neighbours. Items are (sample, label, failed reads for it).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        candidate = index
        replacements = torch.Generator().manual_seed(sample_seed(seed, 1, 1))  # apart from the augmentation seed
        for failed in range(MAX_TRIES):
            try:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed would also queue lazy CUDA/XPU/MTIA seeding,
                    # recording a stack trace each time (about 1 ms per sample); the CPU stream is the same
                    torch.default_generator.manual_seed(seed)
                    sample, label = self.dataset[candidate]
                return sample, label, failed
            except Exception as err:  # any failure of one sample is that sample's problem
                if candidate not in self.reported:
                    self.reported.add(candidate)
                    where = self.dataset.describe(candidate)
                    log.warning("skipping unreadable sample %s: %s: %s", where, type(err).__name__, err)
            step = 1 + int(torch.randint(max(len(self.dataset) - 1, 1), (), generator=replacements))
            candidate = (candidate + step) % len(self.dataset)  # any other sample, never the one that failed
        raise RuntimeError(f"{MAX_TRIES} samples drawn at random in a row failed to load (from index {index}): "
                           f"almost nothing in this dataset is readable; see the warnings")


class FlattenRepeats:
    """Collate for items of k samples each (repeated sampling): ([k, *shape], label, failed reads) items ->
    (inputs [items·k, *shape], labels [items·k, ...] each item's label repeated k times, failed [items]).
    The k samples of an item stay adjacent, so a batch is laid out as one process with the whole batch."""

    def __init__(self, repeats: int):
        self.repeats = repeats

    def __call__(self, items):
        inputs, labels, failed = default_collate(items)
        if inputs.shape[1] != self.repeats:
            raise RuntimeError(f"the dataset declares repeats {self.repeats} but its items have shape "
                               f"{list(inputs.shape[1:])}; each must be [repeats, *input_shape]")
        return inputs.flatten(0, 1), torch.as_tensor(labels).repeat_interleave(self.repeats, dim=0), failed


def make_loader(dataset: Dataset, config: DataConfig, sampler: Sampler, pin_memory: bool, seeded: bool = True) -> DataLoader:
    """The engine's loader: `SeededDataset` under `sampler` (`seeded` False: `dataset` seeds its reads itself, as
    `MixtureDataset` does); items of `sampler.repeats` > 1 samples are flattened into batches of samples
    (`FlattenRepeats`)."""
    workers = config.num_workers
    repeats = sampler.repeats
    return DataLoader(
        SeededDataset(dataset) if seeded else dataset,
        batch_sampler=sampler,
        collate_fn=FlattenRepeats(repeats) if repeats > 1 else None,
        num_workers=workers,
        pin_memory=pin_memory and config.pin_memory,
        persistent_workers=workers > 0 and config.persistent_workers,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # worker base seeds must not consume the global RNG
    )
