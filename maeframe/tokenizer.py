"""Tokenizers turn a batch of samples into a sequence of flat patches, and back."""
from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from .component import Component

if TYPE_CHECKING:  # the masker module imports this one
    from .masker import Mask


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An option given as one int (square) or as two: (height, width), (time, frequency), ..."""
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class TokenSpec:
    """The token grid a tokenizer produces; maskers, targets and the model read it, never re-derive it.

    grid:       tokens along each axis, e.g. (14, 14) for a 224² image with 16² patches, (8, 14, 14) for video.
    patch_size: input elements per token along each axis, e.g. (16, 16) or (2, 16, 16).
    channels:   input channels, e.g. 3 for RGB, 1 for a spectrogram.
    """

    grid: tuple[int, ...]
    patch_size: tuple[int, ...]
    channels: int

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Values in one flat patch: channels × prod(patch_size)."""
        return self.channels * math.prod(self.patch_size)


@dataclass
class Tokens:
    """A tokenized batch.

    patches: [B, N, patch_dim] flat patches in grid (row-major) order, each laid out (*patch_size, channels).
    source:  the batch they came from, e.g. [B, C, H, W]; teacher targets read it.
    """

    patches: Tensor
    source: Tensor


class Tokenizer(Component):
    """Maps a batch of shape [B, *input_shape] to `Tokens` and flat patches back to that shape."""

    kind = "tokenizer"

    @property
    @abstractmethod
    def spec(self) -> TokenSpec: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample the tokenizer expects, e.g. (C, H, W); datasets produce this shape."""

    @abstractmethod
    def tokenize(self, batch: Tensor) -> Tokens: ...

    @abstractmethod
    def untokenize(self, patches: Tensor) -> Tensor:
        """[B, N, patch_dim] -> [B, *input_shape]; exact inverse of `tokenize`, with patch borders at
        multiples of `patch_size` along each axis."""

    def save_pictures(self, panels: Tensor, path: Path, mask: Mask | None = None, *,
                      playable: bool = False) -> list[Path]:
        """Draw reconstructions: panels [B, 4, *input_shape] in [0, 1] (original | masked | reconstruction |
        reconstruction with visible patches pasted back, or, for a target outside pixel space, original |
        masked | true target | prediction), drawn under `mask` (the samples' `Mask`, on the CPU, for
        tokenizers that mark hidden regions themselves). Writes `path` (.png) and any extra files (e.g. a GIF
        for video, audio for spectrograms) and returns their paths. `playable`: also write every playable
        rendering the tokenizer can make (e.g. sound) for every sample, whatever its options limit them to
        during training (`maeframe reconstruct` sets it; training pictures leave it False). The default draws
        [C, H, W] samples with 1 or 3 channels as a PNG grid and has no playable rendering; other modalities
        override it."""
        if panels.dim() != 5 or panels.shape[2] not in (1, 3):
            return []
        from .pictures import save_panels

        save_panels(panels, path)
        return [path]
