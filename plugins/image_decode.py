"""Decoding one image file (a path, or bytes with a name) into a [C, H, W] tensor, for every image dataset.

* Pillow reads every format it knows (`pillow_extensions()`). Transparency — RGBA, LA, PA, a palette or
  a grey/RGB image with a transparent colour — is composited onto `background` (default white) before the
  channels are chosen, so invisible pixels never show whatever colour they happen to store. With
  `alpha: keep` and 4 channels (2 for grey) the alpha channel is kept as the last channel instead.
* Arrays: `.npy` files, and `.tif`/`.tiff` through `tifffile` when installed (the `tiff` extra: any band
  count, 16-bit and float data, which Pillow cannot read), give any number of channels. A 2-D array is one
  channel; a 3-D one is [C, H, W] or [H, W, C], whichever axis has the tokenizer's channel count.
* Values: uint8 stays uint8 (the datasets' `ToDtype(scale=True)` divides by 255); 16-bit integers are
  divided by 65535, other integers by their dtype's maximum and floats are kept as they are, all as float32.
* `max_pixels` refuses images larger than that many pixels before they are decoded (a decompression bomb:
  a small compressed file that expands to gigabytes), with a message naming the option. Pillow's own
  limit is lifted while opening, so the option alone decides (its default is Pillow's, 89,478,485).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import Tensor

from maeframe import Options

PILLOW_LIMIT = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it (a 1024 MB RGBA image / 4 / 3)
ARRAY_SUFFIXES = (".npy",)
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_EXTRA = "pip install 'maeframe[tiff]'"
Source = str | Path | bytes


class ImageTooLarge(ValueError):
    """An image above `max_pixels`."""


class DecodeOptions(Options):
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB colour (0-255) that transparent "
                                             "pixels are composited onto (default white); grey images use its "
                                             "luminance")
    alpha: Literal["composite", "keep"] = Field("composite", description="composite: blend transparency onto "
                                                "`background`; keep: keep alpha as the last channel (tokenizer "
                                                "channels 4 for RGBA, 2 for LA)")
    max_pixels: int | None = Field(PILLOW_LIMIT, gt=0, description="refuse images of more pixels than this (a "
                                   "decompression-bomb guard; Pillow's default limit); null = no limit, only "
                                   "for trusted files")


# Formats Pillow identifies but cannot decode without an external handler or program: left out.
PILLOW_STUBS = {"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"}


def pillow_extensions() -> tuple[str, ...]:
    """Every file suffix Pillow can open and decode (lower case, with the dot), e.g. ('.bmp', '.gif', ...)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in PILLOW_STUBS))


def image_extensions() -> tuple[str, ...]:
    """What the file datasets read by default: Pillow's formats, TIFF and `.npy` arrays."""
    return tuple(sorted({*pillow_extensions(), *TIFF_SUFFIXES, *ARRAY_SUFFIXES}))


def has_tifffile() -> bool:
    try:
        import tifffile  # noqa: F401
    except ImportError:
        return False
    return True


def decode(source: Source, name: str, channels: int, options: DecodeOptions) -> Tensor:
    """One image file -> [channels, H, W]: uint8 for 8-bit data, else float32 (see the module docstring).
    `source` is a path or the file's bytes; `name` (its path or member name) picks the reader by suffix."""
    suffix = Path(name).suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        array = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
        return _fit(_array_to_chw(array, channels, name), channels, name)
    if suffix in TIFF_SUFFIXES and has_tifffile():
        return _fit(_array_to_chw(_read_tiff(source, name, options), channels, name), channels, name)
    return _fit(_pillow(source, name, channels, options), channels, name)


def _pillow(source: Source, name: str, channels: int, options: DecodeOptions) -> Tensor:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # `max_pixels` decides, below, before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with image:
        _check_pixels(image.size[0] * image.size[1], name, options)
        image.load()
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16/32-bit grey, float grey
            return _scale(np.asarray(image))[None]
        if image.mode == "CMYK":
            image = image.convert("RGB")
        transparent = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if options.alpha == "keep" and channels in (2, 4):  # alpha as the last channel (opaque when absent)
            image = image.convert("LA" if channels == 2 else "RGBA")
        elif transparent:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*options.background, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        if image.mode not in ("L", "RGB", "RGBA", "LA"):
            image = image.convert("RGB")
        if channels == 1 and image.mode == "RGB":
            image = image.convert("L")
        array = np.asarray(image)
        return torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)


def _read_tiff(source: Source, name: str, options: DecodeOptions) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tiff:
        series = tiff.series[0]
        _check_pixels(int(np.prod(sorted(series.shape)[-2:])), name, options)  # bands: the short axis
        return series.asarray()


def _check_pixels(pixels: int, name: str, options: DecodeOptions) -> None:
    if options.max_pixels is not None and pixels > options.max_pixels:
        raise ImageTooLarge(f"{name}: {pixels} pixels, above max_pixels={options.max_pixels} (a decompression-"
                            f"bomb guard); raise data.train.options.max_pixels, or set it to null, if you trust "
                            f"the file")


def _scale(array: np.ndarray) -> Tensor:
    """Non-uint8 values as float32: unsigned/signed integers over their dtype's maximum, floats as they are."""
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(array.astype(np.float32) / float(np.iinfo(array.dtype).max))
    if np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.float32))
    raise ValueError(f"values of dtype {array.dtype} are not image data")


def _array_to_chw(array: np.ndarray, channels: int, name: str) -> Tensor:
    """A 2-D [H, W] or 3-D [C, H, W] / [H, W, C] array -> [C, H, W] (uint8 kept, else float32)."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if array.shape[0] != channels and array.shape[-1] in (channels, 1):
            array = np.moveaxis(array, -1, 0)
        elif array.shape[0] not in (channels, 1):
            raise ValueError(f"{name}: array of shape {list(array.shape)} has no axis of {channels} channels "
                             f"(first or last) for the tokenizer")
    else:
        raise ValueError(f"{name}: array of shape {list(array.shape)}: need [H, W], [C, H, W] or [H, W, C]")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    return _scale(np.ascontiguousarray(array))


def _fit(image: Tensor, channels: int, name: str) -> Tensor:
    """[c, H, W] -> [channels, H, W]: equal, or one channel repeated; otherwise an error naming both."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1)
    hint = ""
    if image.shape[0] in (2, 4) and channels in (1, 3):
        hint = " (alpha: keep adds the alpha channel; composite gives 1 or 3)"
    elif Path(name).suffix.lower() in TIFF_SUFFIXES and not has_tifffile():
        hint = f" (multi-band TIFF needs tifffile: {TIFF_EXTRA})"
    raise ValueError(f"{name}: image has {image.shape[0]} channels, the tokenizer expects {channels}{hint}")
