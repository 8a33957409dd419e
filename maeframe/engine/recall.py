"""Cross-modal retrieval metrics: recall@k of paired embeddings (query i's true match is key i)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def match_ranks(queries: Tensor, keys: Tensor, chunk: int = 1024) -> Tensor:
    """queries [N, D], keys [N, D] (row i of each is one pair) -> [N] long: the 1-based rank of key i among all
    keys by cosine similarity to query i. Ties count against the match: the rank is 1 + the number of keys at
    least as similar as the match, other than itself, so a constant embedding ranks every match last."""
    if queries.shape != keys.shape or queries.dim() != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must both be [N, D]")
    keys = F.normalize(keys.float(), dim=1)
    ranks = []
    for start, block in zip(range(0, len(queries), chunk), F.normalize(queries.float(), dim=1).split(chunk)):
        similarity = block @ keys.T                                                  # [n, N]
        rows = torch.arange(len(block))
        match = similarity[rows, start + rows][:, None]
        ranks.append((similarity >= match).sum(1))  # counts the match itself once: rank = 1 + others at least as close
    return torch.cat(ranks)


def recall_at(queries: Tensor, keys: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{"R@k": fraction of queries whose paired key is among the k most similar keys} for each k, in [0, 1]."""
    ranks = match_ranks(queries, keys)
    return {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
