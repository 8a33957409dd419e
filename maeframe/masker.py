"""Maskers choose which tokens the encoder sees. Masks are index tensors with static shapes."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .component import Component, Options
from .errors import OptionError
from .tokenizer import TokenSpec


@dataclass
class Mask:
    """Which tokens are hidden, as gather indices (no boolean indexing, no host sync).

    ids_keep:    [B, V] long, the visible tokens in the order the encoder sees them.
    ids_restore: [B, N] long, for each grid position its index in the [visible..., masked...] order;
                 the decoder uses it to put mask tokens back in place.
    masked:      [B, N] float, 1.0 where the token is hidden, 0.0 where it is visible.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    masked: Tensor

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    def rows(self, start: int, stop: int) -> Mask:
        """The masks of samples start..stop-1 (a process's slice of a global batch)."""
        return Mask(self.ids_keep[start:stop], self.ids_restore[start:stop], self.masked[start:stop])

    @classmethod
    def from_noise(cls, noise: Tensor, num_visible: int) -> Mask:
        """Keep the `num_visible` tokens with the lowest noise per row. noise: [B, N] float."""
        ids_shuffle = torch.argsort(noise, dim=1)
        return cls._from_shuffle(ids_shuffle, num_visible)

    @classmethod
    def from_bool(cls, masked: Tensor) -> Mask:
        """An explicit mask: masked [B, N] bool, True = hidden. Every row must hide the same number."""
        counts = masked.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"every sample must hide the same number of tokens, got counts {counts.tolist()}")
        ids_shuffle = torch.argsort(masked.to(torch.int8), dim=1, stable=True)
        return cls._from_shuffle(ids_shuffle, masked.shape[1] - int(counts[0]))

    @classmethod
    def _from_shuffle(cls, ids_shuffle: Tensor, num_visible: int) -> Mask:
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        masked = (ids_restore >= num_visible).float()
        return cls(ids_shuffle[:, :num_visible], ids_restore, masked)


def visible_count(num_tokens: int, ratio: float) -> int:
    """Tokens kept at a mask ratio, rounded down like the MAE reference: int(N * (1 - ratio))."""
    return int(num_tokens * (1 - ratio))


class Masker(Component):
    """Produces a `Mask` for a batch from the token grid it was built for."""

    kind = "masker"

    def __init__(self, options: Options, spec: TokenSpec):
        super().__init__(options)
        self.spec = spec

    @abstractmethod
    def __call__(self, batch_size: int, device: torch.device) -> Mask: ...

    def visible_tokens(self) -> int | None:
        """Tokens every mask keeps visible with the current options; None when not known in advance."""
        return None

    def check_counts(self, field: str = "ratio") -> None:
        """Called once at validation, after construction: `OptionError` at `options.<field>` when the current
        options keep every token of the grid visible (nothing to reconstruct: the loss over hidden tokens is
        NaN) or none (nothing to encode). Maskers whose count several options or a schedule decide override
        it; those whose `visible_tokens` is None are not checked."""
        visible, total = self.visible_tokens(), self.spec.num_tokens
        if visible is not None and not 0 < visible < total:
            raise OptionError(field, hidden_count_problem(field, getattr(self.options, field, None), visible, total,
                                                          self.spec.grid))


def hidden_count_problem(field: str, value: object, visible: int, total: int, grid: tuple[int, ...]) -> str:
    """The message for options that keep all `total` tokens of `grid` visible, or none."""
    setting = f"{field} {value}" if value is not None else "these options"
    if visible >= total:
        return (f"{setting} hides none of the {total} tokens of grid {grid}: there is nothing to reconstruct "
                f"(the loss over hidden tokens would be NaN); hide at least one token")
    return (f"{setting} keeps none of the {total} tokens of grid {grid} visible: the encoder would see "
            f"nothing; keep at least one token")
