"""Pretrained encoder weights in other projects' file formats: `WeightFormat` components, selected by a
downstream recipe's `init.format` and supplied by plugins (`register_weight_formats`), as the built-in
maeframe, official MAE, VideoMAE and AudioMAE readers are."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import Tensor

from .component import Component
from .tokenizer import TokenSpec


@dataclass(frozen=True)
class EncoderLayout:
    """How the encoder must run to use a format's weights. cls_token: whether the encoder has one (without
    it, every token is encoded and features are their mean); positions: (num_tokens, width) -> [num_tokens,
    width], a fixed position table replacing the per-axis sin-cos one of the token grid (None: sin-cos)."""

    cls_token: bool = True
    positions: Callable[[int, int], Tensor] | None = None


class WeightFormat(Component):
    """Reads a file of pretrained weights into maeframe's encoder names (`encoder.patch_embed.*`,
    `encoder.cls_token`, `encoder.blocks.{i}.*`, `encoder.norm.*`). Constructed with its (empty) options."""

    kind = "weight_format"
    reads_directories: ClassVar[bool] = False  # True: `init.checkpoint` may be a directory (a DCP checkpoint)

    @property
    def layout(self) -> EncoderLayout:
        """The encoder layout these weights need; default: maeframe's (cls token, sin-cos positions)."""
        return EncoderLayout()

    def trained_recipe(self, path: Path) -> dict[str, Any] | None:
        """The recipe (as a dict) the weights at `path` were trained with, when the file records one; default None.
        The core reads it for a joint checkpoint (keys `encoder.modalities.*`): it maps the modality that
        `init.modality` names (or whose tokenizer equals the recipe's) onto a single-modality encoder."""
        return None

    @abstractmethod
    def read(self, path: Path, spec: TokenSpec, model: Any, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        """The weights at `path` as {maeframe name: tensor} (keys outside `encoder.` are dropped), for the
        recipe's token grid `spec`, encoder sizes `model` (`EncoderConfig`) and tokenizer options. A file that
        does not fit is a `maeframe.interop.InteropError` naming the file, the tensor names and shapes."""
