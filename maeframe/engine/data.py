"""Resumable, deterministic data order: the same seed gives the same batches and the same augmentation
whatever the number of workers, and a run resumed mid-epoch continues with the exact next batch."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..recipe import DataConfig


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A distinct 63-bit seed for each (run seed, epoch, position in the epoch)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB)
    return mixed % (2**63 - 1)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields full batches of (dataset index, augmentation seed); the permutation depends only on
    (seed, epoch). `start(epoch, batch)` positions it, e.g. after a resume. Ranks take disjoint strides."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 batches_multiple: int = 1):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        per_rank = length // world_size
        self.batches_per_epoch = (per_rank // batch_size) // batches_multiple * batches_multiple
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {length} samples gives no full batch of {batch_size} "
                             f"(× {batches_multiple} accumulation steps × {world_size} ranks)")
        self.epoch, self.first_batch = 0, 0

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.length, generator=generator)[self.rank::self.world_size].tolist()
        for b in range(self.first_batch, self.batches_per_epoch):
            positions = range(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(order[p], sample_seed(self.seed, self.epoch, p * self.world_size + self.rank)) for p in positions]


class SeededDataset(Dataset):
    """Runs the wrapped dataset's random augmentation under the given per-sample seed, without
    disturbing the caller's RNG (so masking draws in the main process are unaffected)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def make_loader(dataset: Dataset, config: DataConfig, sampler: ResumableBatchSampler, pin_memory: bool) -> DataLoader:
    workers = config.num_workers
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory and config.pin_memory,
        persistent_workers=workers > 0 and config.persistent_workers,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # worker base seeds must not consume the global RNG
    )
