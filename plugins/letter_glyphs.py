"""Letters drawn in the machine's fonts: font discovery, which fonts can draw a letter, and clips of one glyph
moving over a black canvas (the visual side of the spoken-letter pairs in `spoken_letters.py`).

Everything random (font, size, start, direction, speed) comes from one `numpy.random.Generator` the caller
seeds per sample, so a clip is a pure function of (letter, seed, shape)."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .moving_fmnist import bounce

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
FONT_HINT = ("install one with `apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf` "
             "(Debian/Ubuntu; `make data` does it)")
PROBE_SIZE = 32       # pixels: the size at which a font's coverage of a letter is checked
ABSENT = "\ue000"     # a private-use code point: what a font draws for a character it lacks (.notdef or nothing)


def find_fonts(dirs: tuple[str, ...] | list[str] = FONT_DIRS) -> list[Path]:
    """Every TrueType/OpenType file under `dirs` (recursively), sorted; [] when there is none."""
    found: set[Path] = set()
    for folder in dirs:
        root = Path(folder).expanduser()
        if root.is_dir():
            found.update(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    return sorted(found)


@functools.lru_cache(maxsize=512)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _mask(font: ImageFont.FreeTypeFont, text: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(text)
    return mask.size, bytes(mask)


def draws(font_path: str, text: str) -> bool:
    """True when the font has a glyph for every character of `text` (each differs from what the font
    draws for a character it lacks, and is not blank)."""
    try:
        font = load_font(font_path, PROBE_SIZE)
    except OSError:  # not a font FreeType can open
        return False
    absent = _mask(font, ABSENT)
    for char in text:
        size, pixels = _mask(font, char)
        if (size, pixels) == absent or not any(pixels):
            return False
    return True


def render_glyph(text: str, font_path: str, size: int) -> Tensor:
    """`text` in the font at `size` px -> its tight bounding box [h, w] float in [0, 1] (white on black)."""
    font = load_font(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(image).text((-left, -top), text, fill=255, font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def moving_glyph(text: str, fonts: list[str], frames: int, height: int, width: int, rng: np.random.Generator,
                 size_range: tuple[float, float], max_speed: float) -> Tensor:
    """A clip [frames, height, width] in [0, 1]: `text` in a font drawn from `fonts`, its height a fraction
    of the canvas height drawn from `size_range`, starting at a random place and moving in a straight line at
    0..max_speed pixels per frame, bouncing off the canvas edges. All draws come from `rng`."""
    font = fonts[int(rng.integers(len(fonts)))]
    size = max(4, round(height * rng.uniform(*size_range)))
    glyph = render_glyph(text, font, size)
    if glyph.shape[0] > height or glyph.shape[1] > width:  # wide names (e.g. "DZS") or tall glyphs: shrink to fit
        scale = min(height / glyph.shape[0], width / glyph.shape[1])
        glyph = render_glyph(text, font, max(4, math.floor(size * scale)))
        glyph = glyph[:height, :width]
    gh, gw = glyph.shape
    start_y, start_x, angle, speed = rng.uniform(size=4)
    angle, speed = 2 * math.pi * angle, max_speed * speed
    t = torch.arange(frames, dtype=torch.float64)
    rows = bounce(start_y * (height - gh) + speed * math.sin(angle) * t, height - gh).round().long()
    cols = bounce(start_x * (width - gw) + speed * math.cos(angle) * t, width - gw).round().long()
    clip = torch.zeros(frames, height, width)
    for k, (y, x) in enumerate(zip(rows.tolist(), cols.tolist())):
        clip[k, y:y + gh, x:x + gw] = glyph
    return clip
