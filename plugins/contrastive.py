"""The inter-modal contrastive term of CAV-MAE: InfoNCE between the L2-normalised pooled representations of
two modalities of the same samples, the other samples of the global batch as negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maeframe import all_rank_rows


def info_nce(first: Tensor, second: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """first [B, D], second [B, D]: pooled representations of B pairs (row i of each is one sample) ->
    (loss with the `first` rows as queries, loss with the `second` rows as queries), each a 0-dim float32
    tensor: mean over queries of -log softmax_j(cos(q_i, k_j) / temperature)[i]. Under torchrun the rows of
    every process join (`all_rank_rows`), so the negatives are the whole global batch and every process
    computes the same value."""
    first = F.normalize(all_rank_rows(first).float(), dim=1)
    second = F.normalize(all_rank_rows(second).float(), dim=1)
    logits = first @ second.T / temperature                                            # [N·B, N·B]
    labels = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
