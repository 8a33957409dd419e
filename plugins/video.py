"""Video tubelet tokenizer: [B, C, T, H, W] <-> [B, (T/t)·(H/p)·(W/q), t·p·q·C] (VideoMAE's cube embedding).

A token is a tubelet of `tubelet` consecutive frames × a p×q spatial patch. Tokens are numbered row-major
over the (T/t, H/p, W/q) grid (time slowest), and each flat patch is laid out (tubelet, p, q, C), the
same order VideoMAE uses for its pixel targets. Reconstructions are drawn as a PNG (per sample four rows
— original, masked, reconstruction, reconstruction with the visible tubelets pasted back — by frames) and
an animated GIF playing the four side by side.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Mask, Tokenizer, Tokens, TokenSpec, hookimpl
from .image import ImagePatchOptions

MIN_SIDE = 112          # frames smaller than this are enlarged (nearest neighbour) in the pictures
GIF_FRAME_MS = 250      # display time of one frame in the GIF


class VideoTubeOptions(ImagePatchOptions):
    """The image patch options (frame size, spatial patch, channels; each patch divides the frame) plus time."""

    num_frames: int = Field(16, ge=1, description="frames per clip (T); must be a multiple of tubelet")
    tubelet: int = Field(2, ge=1, description="frames per token (VideoMAE: 2)")

    @model_validator(mode="after")
    def _tubelets_divide_clip(self) -> VideoTubeOptions:
        if self.num_frames % self.tubelet:
            raise ValueError(f"tubelet {self.tubelet} does not divide num_frames {self.num_frames}: a clip must "
                             f"hold a whole number of tubelets (try num_frames "
                             f"{self.num_frames - self.num_frames % self.tubelet or self.tubelet})")
        return self


class VideoTubeTokenizer(Tokenizer):
    """Non-overlapping t×p×q tubelets; grid (T/t, H/p, W/q), patch_size (t, p, q)."""

    Options = VideoTubeOptions

    def __init__(self, options: VideoTubeOptions):
        super().__init__(options)
        (h, w), (p, q), t = options.hw, options.pq, options.tubelet
        self._spec = TokenSpec(grid=(options.num_frames // t, h // p, w // q), patch_size=(t, p, q),
                               channels=options.channels)

    @property
    def spec(self) -> TokenSpec:
        return self._spec

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.options.channels, self.options.num_frames, *self.options.hw)

    def tokenize(self, batch: Tensor) -> Tokens:
        """batch [B, C, T, H, W] -> Tokens(patches [B, gt·gh·gw, t·p·q·C])."""
        if tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"video_tube tokenizer expects [B, {', '.join(map(str, self.input_shape))}] "
                             f"(B, C, T, H, W), got {list(batch.shape)}")
        b, c = batch.shape[:2]
        (gt, gh, gw), (t, p, q) = self._spec.grid, self._spec.patch_size
        x = batch.reshape(b, c, gt, t, gh, p, gw, q).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return Tokens(patches=x.reshape(b, gt * gh * gw, t * p * q * c), source=batch)

    def untokenize(self, patches: Tensor) -> Tensor:
        """patches [B, gt·gh·gw, t·p·q·C] -> [B, C, T, H, W]."""
        b = patches.shape[0]
        (gt, gh, gw), (t, p, q), c = self._spec.grid, self._spec.patch_size, self._spec.channels
        x = patches.reshape(b, gt, gh, gw, t, p, q, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, gt * t, gh * p, gw * q)

    def save_pictures(self, panels: Tensor, path: Path, mask: Mask | None = None) -> list[Path]:
        """panels [B, 4, C, T, H, W] in [0, 1] -> `path` (PNG: per sample 4 rows × T frames) and
        `path` with suffix .gif (per sample one row of the 4 panels side by side, animated over T)."""
        if panels.dim() != 6 or panels.shape[2] not in (1, 3):
            return []
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = _enlarge(panels.float().clamp(0, 1))           # [B, 4, C, T, H', W']
        png = _frame_grid(frames)
        _to_pil(png).save(path)
        gif = path.with_suffix(".gif")
        movie = [_to_pil(_panel_row(frames[:, :, :, t])) for t in range(frames.shape[3])]
        movie[0].save(gif, save_all=True, append_images=movie[1:], duration=GIF_FRAME_MS, loop=0,
                      optimize=False)
        return [path, gif]


def _enlarge(panels: Tensor) -> Tensor:
    """Nearest-neighbour upscaling of small frames so they can be seen: [B, K, C, T, H, W]."""
    b, k, c, t, h, w = panels.shape
    scale = math.ceil(MIN_SIDE / min(h, w))
    if scale <= 1:
        return panels
    flat = panels.permute(0, 1, 3, 2, 4, 5).reshape(b * k * t, c, h, w)
    flat = F.interpolate(flat, scale_factor=scale, mode="nearest")
    return flat.reshape(b, k, t, c, h * scale, w * scale).permute(0, 1, 3, 2, 4, 5)


def _tile(images: Tensor, gap: int) -> Tensor:
    """images [R, K, C, H, W] -> one [C, R·H + (R+1)·gap, K·W + (K+1)·gap] picture on white."""
    r, k, c, h, w = images.shape
    canvas = torch.ones(c, r * h + (r + 1) * gap, k * w + (k + 1) * gap)
    for i in range(r):
        for j in range(k):
            top, left = gap + i * (h + gap), gap + j * (w + gap)
            canvas[:, top:top + h, left:left + w] = images[i, j]
    return canvas


def _stack_vertically(pictures: list[Tensor], gap: int) -> Tensor:
    width = max(p.shape[2] for p in pictures)
    parts = []
    for i, picture in enumerate(pictures):
        if i:
            parts.append(torch.ones(picture.shape[0], gap, width))
        parts.append(F.pad(picture, (0, width - picture.shape[2]), value=1.0))
    return torch.cat(parts, dim=1)


def _frame_grid(frames: Tensor) -> Tensor:
    """[B, 4, C, T, H, W] -> per sample a block of 4 rows × T frames; blocks separated by a wider gap."""
    blocks = [_tile(sample.permute(0, 2, 1, 3, 4), gap=2) for sample in frames]   # sample [4, C, T, H, W]
    return _stack_vertically(blocks, gap=8)


def _panel_row(frame: Tensor) -> Tensor:
    """[B, 4, C, H, W] (one time step) -> B rows of the 4 panels side by side."""
    return _tile(frame, gap=2)


def _to_pil(picture: Tensor):
    from PIL import Image

    array = (picture * 255).round().to(torch.uint8)
    if array.shape[0] == 1:
        return Image.fromarray(array[0].numpy())
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


@hookimpl
def register_tokenizers(register):
    register("video_tube", VideoTubeTokenizer)


@hookimpl
def validate_recipe(recipe):
    """The ViT's sin-cos position embedding of a 3-D grid splits each width into sin and cos over three
    axes: reject widths that are not multiples of 6 before training starts, not when the model is built."""
    tokenizers = [recipe.tokenizer] if recipe.tokenizer is not None else [
        modality.tokenizer for modality in (getattr(recipe, "modalities", None) or {}).values()]
    if all(tokenizer.name != "video_tube" for tokenizer in tokenizers):
        return
    model = getattr(recipe, "model", None)
    for field in ("embed_dim", "decoder_embed_dim"):
        width = getattr(model, field, None)
        if width is not None and width % 6:
            raise ValueError(f"model.{field}: {width} is not a multiple of 6; the video_tube grid has 3 axes and "
                             f"the sin-cos position embedding gives each a sin and a cos part (nearest: "
                             f"{', '.join(str(w) for w in (width - width % 6, width - width % 6 + 6) if w)})")
