"""Image patch tokenizer: [B, C, H, W] <-> [B, (H/p)·(W/q), p·q·C] in the MAE reference layout, for any
channel count C (RGB, grey, RGBA, multispectral bands). Reconstruction pictures draw 1 or 3 of the channels:
`display_channels`, by default all of 1 or 3, the first of 2, the first three of 4 or more."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor

from maeframe import Mask, Options, Tokenizer, Tokens, TokenSpec, as_pair, hookimpl


class ImagePatchOptions(Options):
    image_size: int | tuple[int, int] = Field(224, description="input height and width (one int = square)")
    patch_size: int | tuple[int, int] = Field(16, description="patch height and width; must divide the image")
    channels: int = Field(3, ge=1, description="input channels: 3 for RGB, 1 for grayscale, any count for "
                                               "multispectral or medical data")
    display_channels: list[int] | None = Field(None, description="channels drawn in reconstruction pictures, "
                                               "1 (grey) or 3 (as red, green, blue), 0-based, e.g. [3, 2, 1] for "
                                               "Sentinel-2 true colour; null = all of 1 or 3, the first of 2, "
                                               "the first three of 4+")

    @property
    def hw(self) -> tuple[int, int]:
        return as_pair(self.image_size)

    @property
    def pq(self) -> tuple[int, int]:
        return as_pair(self.patch_size)

    @model_validator(mode="after")
    def _patch_divides_image(self) -> ImagePatchOptions:
        for axis, n, p in zip(("height", "width"), self.hw, self.pq):
            if n <= 0 or p <= 0 or n % p:
                raise ValueError(f"patch {axis} {p} does not divide image {axis} {n}")
        return self

    @field_validator("display_channels")
    @classmethod
    def _drawable(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        channels = info.data.get("channels", 1)
        if value is not None and len(value) not in (1, 3):
            raise ValueError(f"takes 1 or 3 channels to draw, got {len(value)}")
        if value is not None and not all(0 <= c < channels for c in value):
            raise ValueError(f"{value} must lie in 0..{channels - 1} (channels: {channels})")
        return value

    @property
    def drawn(self) -> list[int]:
        """The channels pictures draw (see `display_channels`)."""
        if self.display_channels is not None:
            return list(self.display_channels)
        if self.channels in (1, 3):
            return list(range(self.channels))
        return [0] if self.channels == 2 else [0, 1, 2]


class ImagePatchTokenizer(Tokenizer):
    """Non-overlapping patches in row-major grid order, each patch flattened as (p, q, C)."""

    Options = ImagePatchOptions

    def __init__(self, options: ImagePatchOptions):
        super().__init__(options)
        (h, w), (p, q) = options.hw, options.pq
        self._spec = TokenSpec(grid=(h // p, w // q), patch_size=(p, q), channels=options.channels)

    @property
    def spec(self) -> TokenSpec:
        return self._spec

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.options.channels, *self.options.hw)

    def tokenize(self, batch: Tensor) -> Tokens:
        """batch [B, C, H, W] -> Tokens(patches [B, gh·gw, p·q·C])."""
        if tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"image_patch tokenizer expects [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(batch.shape)}")
        b, c, _, _ = batch.shape
        (gh, gw), (p, q) = self._spec.grid, self._spec.patch_size
        x = batch.reshape(b, c, gh, p, gw, q).permute(0, 2, 4, 3, 5, 1)
        return Tokens(patches=x.reshape(b, gh * gw, p * q * c), source=batch)

    def untokenize(self, patches: Tensor) -> Tensor:
        """patches [B, gh·gw, p·q·C] -> [B, C, H, W]."""
        b = patches.shape[0]
        (gh, gw), (p, q), c = self._spec.grid, self._spec.patch_size, self._spec.channels
        x = patches.reshape(b, gh, gw, p, q, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * q)

    def save_pictures(self, panels: Tensor, path: Path, mask: Mask | None = None, *,
                      playable: bool = False) -> list[Path]:
        """panels [B, 4, C, H, W] -> a PNG of the `display_channels` (1 or 3 of the C)."""
        return super().save_pictures(panels[:, :, self.options.drawn], path, mask, playable=playable)


@hookimpl
def register_tokenizers(register):
    register("image_patch", ImagePatchTokenizer)
