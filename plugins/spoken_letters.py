"""Spoken letters paired with moving letters: a real audio-visual dataset built offline (`klettres_letters`).

Each sample pairs one real KLettres recording of a spoken letter (Debian `klettres-data`,
/usr/share/klettres/<lang>/alpha/*.ogg) with a short clip showing the same letter drawn in one of the
machine's fonts, moving over a black canvas. Label = the letter (its name in <lang>/sounds.xml, e.g. "A",
"Ő", "CS"), shared across languages: the English and the French "E" are both class "E".

* audio: the klettres fbank pipeline of `audio_data.py` ([1, T, F] log-mel, same options and augmentations);
* visual: font, size, start, direction and speed drawn from one per-sample seed (`letter_glyphs.py`): in
  training a seed drawn from torch's global generator, which the engine seeds per sample (new motion every
  epoch, reproducible run; `redraw: false` fixes them as in evaluation); in evaluation the seed is (seed, split,
  index), so test clip i never changes. A 4-D visual shape (C, T, H, W) gets the whole clip, a 3-D one (C, H, W)
  one frame of it (CAV-MAE pretrains on one frame per video: a random one in training, the middle one in
  evaluation);
* split: within each language every `test_every`-th recording (sorted by file name) is held out (`test`), so
  no recording is in both splits, and the test letters are heard in voices (languages) absent from training.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from maeframe import Dataset, hookimpl

from .audio_data import KLETTRES_ROOT, AudioOptions, KlettresDataset, KlettresOptions, klettres_sound_names
from .letter_glyphs import FONT_DIRS, FONT_HINT, draws, find_fonts, moving_glyph

log = logging.getLogger("maeframe.spoken_letters")

# Languages whose letters are Latin script: the DejaVu fonts of a minimal Debian draw every one of them.
LATIN_LANGUAGES = ["cs", "da", "de", "en", "en_GB", "es", "fr", "hu", "it", "lt", "nb", "nds", "nl", "pt_BR", "tn"]


class SpokenLettersOptions(AudioOptions):
    root: str = Field(KLETTRES_ROOT, description="klettres-data folder: <lang>/alpha/*.ogg and <lang>/sounds.xml")
    languages: list[str] = Field(LATIN_LANGUAGES, min_length=1, description="language folders to use (default: "
                                 "the 15 Latin-script ones; ar, he, ru, uk need fonts drawing their scripts, "
                                 "which DejaVu does; ml needs e.g. fonts-smc)")
    split: Literal["all", "train", "test"] = Field("all", description="all recordings, or the fixed split: 1 in "
                                                   "test_every recordings of each language is test")
    test_every: int = Field(5, ge=2, description="hold out every test_every-th recording of each language")
    audio_modality: str = Field("audio", min_length=1, description="modality name of the spectrogram in samples")
    visual_modality: str = Field("visual", min_length=1, description="modality name of the letter clip in samples")
    fonts: list[str] | None = Field(None, description="font files to draw with (default: every .ttf/.otf/.ttc "
                                                      "under font_dirs); each letter uses those that draw it")
    font_dirs: list[str] = Field(list(FONT_DIRS), description="folders searched for fonts when fonts is null")
    video_frames: int = Field(10, ge=1, description="frames rendered per clip; a 3-D visual shape takes one of "
                                                    "them (CAV-MAE extracts 10 frames per video)")
    size_range: tuple[float, float] = Field((0.35, 0.8), description="letter height as a fraction of the canvas "
                                                                     "height, drawn uniformly per clip")
    max_speed: float = Field(2.0, ge=0, description="fastest motion, pixels per frame (speed drawn in 0..max)")
    seed: int = Field(0, description="evaluation clips: clip i is fixed by (seed, split, i); training draws anew")
    redraw: bool = Field(True, description="training: draw each clip anew every epoch (font, size, motion, "
                                           "frame); false: clip i is fixed by (seed, split, i) as in evaluation")
    visual_mean: tuple[float, ...] = Field((0.0,), description="visual normalisation mean, one per channel or one "
                                                               "for all (pixels are in [0, 1])")
    visual_std: tuple[float, ...] = Field((1.0,), description="visual normalisation std, one per channel or one")

    @field_validator("size_range")
    @classmethod
    def _sizes(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"size_range {value} must satisfy 0 < low <= high <= 1")
        return value

    @model_validator(mode="after")
    def _paired(self):
        if self.audio_modality == self.visual_modality:
            raise ValueError(f"audio_modality and visual_modality are both {self.audio_modality!r}")
        if self.repeats != 1:
            raise ValueError("repeats > 1 (repeated sampling) is not supported for paired samples")
        return self


class SpokenLettersDataset(Dataset):
    """Yields ({audio_modality: [1, T, F], visual_modality: [C, T', H, W] or [C, H, W]}, letter index)."""

    Options = SpokenLettersOptions
    paired = True

    def __init__(self, options: SpokenLettersOptions, input_shape: dict[str, tuple[int, ...]], train: bool):
        super().__init__(options, input_shape, train)
        self._build(options, dict(input_shape), train)

    def _build(self, options: SpokenLettersOptions, shapes: dict[str, tuple[int, ...]], train: bool) -> None:
        """Set up the sides named in `shapes` ({modality: input shape}); the recordings are always listed (they
        fix the samples, split and labels) but decoded only when the audio side is asked for."""
        a, v = options.audio_modality, options.visual_modality
        unknown = sorted(set(shapes) - {a, v})
        if unknown or not shapes:
            raise ValueError(f"klettres_letters yields modalities {[a, v]}; the model has {sorted(shapes)} "
                             f"(set audio_modality / visual_modality to the model's modality names)")
        self.sides = list(shapes)
        self.visual_shape = tuple(shapes.get(v, (1, 32, 32)))
        if len(self.visual_shape) not in (3, 4):
            raise ValueError(f"klettres_letters: the {v!r} input shape {self.visual_shape} must be (C, H, W) or "
                             f"(C, T, H, W)")
        channels = self.visual_shape[0]
        for field in ("visual_mean", "visual_std"):
            if len(getattr(options, field)) not in (1, channels):
                raise ValueError(f"{field} has {len(getattr(options, field))} values for {channels} channels")
        if len(self.visual_shape) == 4 and self.visual_shape[1] > options.video_frames:
            raise ValueError(f"video_frames {options.video_frames} is below the clip's {self.visual_shape[1]} frames")
        self.audio = KlettresDataset(self._audio_options(options), tuple(shapes.get(a, (1, 128, 128))), train)
        self._name_recordings(Path(options.root).expanduser())
        self.fonts_of = self._pick_fonts() if v in shapes else {}
        self.mean = torch.tensor(options.visual_mean).view(-1, 1, 1)
        self.std = torch.tensor(options.visual_std).view(-1, 1, 1)

    @staticmethod
    def _audio_options(options: SpokenLettersOptions) -> KlettresOptions:
        fields = set(AudioOptions.model_fields) | {"root", "languages", "split", "test_every"}
        return KlettresOptions(**options.model_dump(include=fields), kinds=["alpha"], label="sound")

    def _name_recordings(self, root: Path) -> None:
        """Keep the recordings sounds.xml names (the name is the letter drawn), labelled by sorted names."""
        named: dict[str, str] = {}
        for language in self.options.languages:
            named.update(klettres_sound_names(root, language))
        # classes over both splits, so a letter has the same index in the train and the test set
        self.classes = sorted({name for file, name in named.items()
                               if Path(file).parent.name == "alpha" and (root / file).is_file()})
        kept, names = [], []
        for path, _ in self.audio.items:
            name = named.get(str(path.relative_to(root)))
            if name is None:
                log.warning("klettres_letters: passing over %s: it has no name in its sounds.xml", path)
                continue
            kept.append(path)
            names.append(name)
        if not kept:
            raise ValueError(f"klettres_letters: no named recordings for languages {self.options.languages}")
        index = {name: i for i, name in enumerate(self.classes)}
        self.audio.items = [(path, index[name]) for path, name in zip(kept, names)]
        self.letters = names

    def _pick_fonts(self) -> dict[str, list[str]]:
        """{letter: the font files that draw it}; an error names a letter no font draws."""
        o = self.options
        fonts = [str(Path(f).expanduser()) for f in o.fonts] if o.fonts is not None else \
            [str(p) for p in find_fonts(o.font_dirs)]
        absent = [f for f in fonts if not Path(f).is_file()]
        if absent:
            raise FileNotFoundError(f"klettres_letters: fonts {absent} do not exist")
        if not fonts:
            raise FileNotFoundError(f"klettres_letters: no font file under {o.font_dirs}; {FONT_HINT}")
        fonts_of = {name: [f for f in fonts if draws(f, name)] for name in self.classes}
        undrawn = sorted(name for name, found in fonts_of.items() if not found)
        if undrawn:
            raise ValueError(f"klettres_letters: none of the {len(fonts)} fonts draws {undrawn}; install fonts for "
                             f"their script or leave their languages out of `languages`")
        return fonts_of

    def __len__(self) -> int:
        return len(self.audio)

    def describe(self, index: int) -> str:
        return self.audio.describe(index)

    def unreadable(self) -> list[str]:
        return self.audio.unreadable()

    def clip_seed(self, index: int) -> np.random.Generator:
        """The generator of sample `index`'s visual draws (see the module docstring)."""
        if self.train and self.options.redraw:
            return np.random.default_rng(int(torch.randint(0, 2**62, ())))
        split = ("all", "train", "test").index(self.options.split)  # the bank and the queries draw apart
        return np.random.default_rng([self.options.seed % 2**63, split, index])

    def visual(self, index: int) -> Tensor:
        """The letter of recording `index`, moving: normalised [C, T, H, W], or one frame [C, H, W]."""
        o, shape = self.options, self.visual_shape
        rng = self.clip_seed(index)
        letter = self.letters[index]
        clip = moving_glyph(letter, self.fonts_of[letter], o.video_frames, shape[-2], shape[-1], rng,
                            o.size_range, o.max_speed)                                   # [L, H, W]
        if len(shape) == 3:
            frame = int(rng.integers(o.video_frames)) if self.train else o.video_frames // 2
            frames = clip[frame][None].expand(shape[0], -1, -1)                          # [C, H, W]
            return (frames - self.mean) / self.std
        clip = clip[: shape[1]][None].expand(shape[0], -1, -1, -1)                       # [C, T, H, W]
        return (clip - self.mean[..., None]) / self.std[..., None]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int]:
        o, label = self.options, self.audio.items[index][1]
        sample = {}
        if o.audio_modality in self.sides:
            sample[o.audio_modality], label = self.audio[index]
        if o.visual_modality in self.sides:
            sample[o.visual_modality] = self.visual(index)
        return sample, label

    def denormalize(self, batch: Tensor) -> Tensor:
        """Either modality's normalised batch -> [0, 1] for pictures; the batch's shape tells the modality."""
        return denormalize_by_shape(batch, self.input_shape, {self.options.audio_modality: self.audio.denormalize,
                                                              self.options.visual_modality: self.denormalize_visual})

    def denormalize_visual(self, batch: Tensor) -> Tensor:
        """Normalised visual batch [B, C, (T,) H, W] -> [0, 1]."""
        shape = (1, -1) + (1,) * (batch.dim() - 2)
        return (batch * self.std.view(shape).to(batch.device) + self.mean.view(shape).to(batch.device)).clamp(0, 1)


class SpokenLetterSounds(SpokenLettersDataset):
    """The audio side alone (single-modality recipes): ([1, T, F], letter index), the same samples, split and
    labels as `klettres_letters`."""

    paired = False

    def __init__(self, options: SpokenLettersOptions, input_shape: tuple[int, ...], train: bool):
        Dataset.__init__(self, options, input_shape, train)
        self._build(options, {options.audio_modality: tuple(input_shape)}, train)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample, label = super().__getitem__(index)
        return sample[self.options.audio_modality], label

    def denormalize(self, batch: Tensor) -> Tensor:
        return self.audio.denormalize(batch)


class SpokenLetterClips(SpokenLettersDataset):
    """The visual side alone (single-modality recipes): ([C, (T,) H, W], letter index), the same samples,
    split and labels as `klettres_letters` (the recordings are listed, not decoded)."""

    paired = False

    def __init__(self, options: SpokenLettersOptions, input_shape: tuple[int, ...], train: bool):
        Dataset.__init__(self, options, input_shape, train)
        self._build(options, {options.visual_modality: tuple(input_shape)}, train)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample, label = super().__getitem__(index)
        return sample[self.options.visual_modality], label

    def denormalize(self, batch: Tensor) -> Tensor:
        return self.denormalize_visual(batch)


def denormalize_by_shape(batch: Tensor, shapes: dict[str, tuple[int, ...]], undo: dict) -> Tensor:
    """Apply undo[m] for the one modality m whose input shape is the batch's [B, *shape]; a ValueError when
    none or both match (then the pictures cannot tell the modalities apart: give them different shapes)."""
    found = [name for name, shape in shapes.items() if tuple(batch.shape[1:]) == tuple(shape)]
    if len(found) != 1:
        raise ValueError(f"a batch of shape {tuple(batch.shape)} matches {found or 'none'} of the input shapes "
                         f"{shapes}: cannot tell which modality to draw")
    return undo[found[0]](batch)


@hookimpl
def register_datasets(register):
    register("klettres_letters", SpokenLettersDataset)
    register("klettres_letter_sounds", SpokenLetterSounds)
    register("klettres_letter_clips", SpokenLetterClips)
