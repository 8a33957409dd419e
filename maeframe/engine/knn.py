"""Weighted k-nearest-neighbour classification on frozen encoder features (cosine, k=20, T=0.07)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import MaeframeError
from ..tokenizer import Tokenizer
from .distributed import World, map_dataset


@torch.no_grad()
def encode_dataset(encoder: torch.nn.Module, tokenizer: Tokenizer, dataset: Dataset, device: torch.device,
                   batch_size: int = 256, pool: str = "mean", num_workers: int = 0,
                   world: World = World()) -> tuple[Tensor, Tensor]:
    """Features of every sample with all tokens visible: ([N, D] float32 on CPU, [N] long labels).
    pool: "mean" over patch tokens, "cls", or "all" (every token: [N, 1 + L, D], [N, L, D] without a cls token); num_workers: DataLoader processes decoding the samples. Under
    torchrun each rank encodes its share and every rank gets all features (`map_dataset`)."""
    was_training = encoder.training
    encoder.eval()

    start = 0 if encoder.cls_token is None else 1  # an encoder without cls token: every row is a patch token
    if pool == "cls" and not start:
        raise MaeframeError("pool cls: the encoder has no cls token (model.cls_token: false); pool avg instead")

    def features(batch: Tensor) -> Tensor:
        latent = encoder(tokenizer.tokenize(batch.to(device)).patches)
        pooled = {"mean": lambda: latent[:, start:].mean(1), "cls": lambda: latent[:, 0], "all": lambda: latent}[pool]()
        return pooled.float().cpu()

    out = map_dataset(features, dataset, world, batch_size, num_workers)
    encoder.train(was_training)
    return out


def knn_features(encoder: torch.nn.Module, tokenizer: Tokenizer, datasets: list[Dataset], device: torch.device,
                 autocast=contextlib.nullcontext, pool: str = "avg", batch_size: int = 256,
                 num_workers: int = 0, world: World = World()) -> list[tuple[Tensor, Tensor]]:
    """The k-NN protocol's features (the `knn` task and the pretraining monitor): `encode_dataset` of each
    dataset under `autocast`, pool as recipes name it ("avg": mean of the patch tokens, "cls"; "all": every
    token, [N, 1 + L, D], for `maeframe embed`).
    Returns one ([N, D] float32 features, [N] labels) pair per dataset; consumes no global RNG."""
    encode = dict(batch_size=batch_size, pool={"avg": "mean", "cls": "cls", "all": "all"}[pool], num_workers=num_workers,
                  world=world)
    with autocast():
        return [encode_dataset(encoder, tokenizer, dataset, device, **encode) for dataset in datasets]


def knn_scores(train_features: Tensor, train_labels: Tensor, query_features: Tensor, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Class scores [M, C]: each of the k most cosine-similar training samples votes for its label with
    weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_features, dim=1)
    k = min(k, len(bank))
    scores = []
    for queries in F.normalize(query_features, dim=1).split(chunk):
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        scores.append(votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp()))
    return torch.cat(scores)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of `knn_scores` on the test set, in [0, 1]."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes)
    return (scores.argmax(1) == test_labels).float().mean().item()
