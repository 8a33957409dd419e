"""Image patch tokenizer: [B, C, H, W] <-> [B, (H/p)·(W/q), p·q·C] in the MAE reference layout."""
from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Options, Tokenizer, Tokens, TokenSpec, as_pair, hookimpl


class ImagePatchOptions(Options):
    image_size: int | tuple[int, int] = Field(224, description="input height and width (one int = square)")
    patch_size: int | tuple[int, int] = Field(16, description="patch height and width; must divide the image")
    channels: int = Field(3, ge=1, description="input channels: 3 for RGB, 1 for grayscale")

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


@hookimpl
def register_tokenizers(register):
    register("image_patch", ImagePatchTokenizer)
