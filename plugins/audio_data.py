"""Audio datasets: log-mel filterbank spectrograms from folders of recordings, CSV lists, and klettres.

Every dataset yields ([1, T, F] float32, label) for the `spectrogram` tokenizer's input shape (1, T, F):
T time frames (the tokenizer's `target_length`) × F mel bins. One recording becomes one sample:

1. decode with `soundfile` (wav, flac, ogg, ...), mix to mono by averaging the channels;
2. resample to `sample_rate` (16 kHz) with torchaudio's windowed-sinc resampler (kernel cached per rate pair);
3. subtract the waveform mean (as AudioMAE does) and compute Kaldi-compatible fbank features with
   `torchaudio.compliance.kaldi.fbank` (hanning window, 25 ms / 10 ms, htk_compat, no energy, dither 0);
4. (training, optional `roll_gain`) roll the frames circularly and add a random gain, the feature-domain
   version of AudioMAE's waveform roll + magnitude augmentation;
5. crop to T frames (a random window for training, the start for evaluation) or pad at the end;
6. (training, optional `freqm` / `timem`) SpecAugment: one frequency stripe of up to `freqm` mel bins and
   one time stripe of up to `timem` frames set to 0 (torchaudio FrequencyMasking / TimeMasking, before
   normalisation, as AudioMAE);
7. normalise: `(x - mean) / (2 * std)` (norm `audiomae`, the default, as AudioMAE and AST) or
   `(x - mean) / std` (norm `standard`); mean/std default to AudioMAE's AudioSet values;
8. (training, optional `noise`) AudioMAE's noise: add U(0, 1) · U(0, 1) / 10 and roll by -10..9 frames.
Every random draw of steps 4-8 comes from torch's global generator, which the engine seeds per sample,
so augmentations are reproducible from the sample's seed (and across a resume).

Steps 1-3 (the expensive part) can be cached on disk (`cache_dir`). Files whose header cannot be read
are passed over at construction and reported through `unreadable()`; files failing later raise
`AudioError` for the engine's loader, which logs, replaces and counts them like any unreadable sample. Both
fall under the one limit, `data.max_bad_fraction`, judged by the engine. `fbank_stats` / `audio_stats` compute a
dataset's mean and std (`maeframe audio-stats`).
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path
from typing import Literal

import soundfile as sf
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from maeframe import Dataset, Options, hookimpl

from .audio_features import (AUDIO_EXTENSIONS, AUDIOSET_MEAN, AUDIOSET_STD, DISPLAY_RANGE, AudioError, FbankConfig,
                             FeatureCache, audio_features, fit_length)
from .folders import OUTSIDE_CLASSES, extension_reason, log_passed_over, preprocessing_options

log = logging.getLogger("maeframe.audio")


KLETTRES_ROOT = "/usr/share/klettres"
KLETTRES_HINT = "install it with `apt-get install klettres-data` (Debian/Ubuntu; `make data` does it)"


class AudioOptions(Options):
    sample_rate: int = Field(16000, gt=0, description="recordings are resampled to this rate (Hz) before fbank")
    frame_length_ms: float = Field(25.0, gt=0, description="fbank analysis window (ms)")
    frame_shift_ms: float = Field(10.0, gt=0, description="fbank hop (ms); T frames cover T × shift ms")
    window_type: Literal["hanning", "hamming", "povey", "rectangular", "blackman"] = Field(
        "hanning", description="fbank window (AudioMAE: hanning)")
    remove_dc: bool = Field(True, description="subtract the waveform mean before fbank (AudioMAE does)")
    dither: float = Field(0.0, ge=0, description="Kaldi dither added in training (evaluation always uses 0); "
                                                 "needs cache_dir unset")
    roll_gain: bool = Field(False, description="training: roll the frames circularly by a random offset and add "
                                               "2·ln(g), g ~ Beta(10, 10) + 0.5 — AudioMAE's roll + magnitude "
                                               "augmentation applied to the log-mel features")
    freqm: int = Field(0, ge=0, description="training: SpecAugment frequency mask, one stripe of 0..freqm-1 mel "
                                           "bins set to 0 before normalisation (AudioMAE AudioSet: 48; 0 = off)")
    timem: int = Field(0, ge=0, description="training: SpecAugment time mask, one stripe of 0..timem-1 frames "
                                           "(AudioMAE AudioSet: 192 of 1024; 0 = off)")
    noise: bool = Field(False, description="training: AudioMAE's noise augmentation after normalisation (uniform "
                                           "noise of random scale <= 0.1, then a roll by -10..9 frames)")
    mean: float = Field(AUDIOSET_MEAN, description="normalisation mean of the log-mel values (AudioSet default)")
    std: float = Field(AUDIOSET_STD, gt=0, description="normalisation std of the log-mel values (AudioSet default)")
    norm: Literal["audiomae", "standard"] = Field("audiomae", description="audiomae: (x - mean) / (2 std) "
                                                  "as AudioMAE/AST; standard: (x - mean) / std")
    stats_file: str | None = Field(None, description="JSON written by `maeframe audio-stats --write`; when set, "
                                                     "its mean and std replace the two options above")
    pad_value: float | None = Field(None, description="log-mel value appended to recordings shorter than T frames; "
                                                      "None = mean (0 after normalisation); AudioMAE pads with 0")
    cache_dir: str | None = Field(None, description="folder for an on-disk fbank cache (one .npy per file, "
                                                    "keyed by path, size, mtime and fbank options)")
    limit: int | None = Field(None, gt=0, description="use only the first N recordings (quick runs)")
    repeats: int = Field(1, ge=1, description="training: samples per decoded recording (repeated sampling): k "
                                              "random crops / roll+gain / SpecAugment / noise draws of one fbank, "
                                              "counted as k samples of data.batch_size (which k must divide)")
    display_range: tuple[float, float] = Field(DISPLAY_RANGE, description="log-mel values drawn as the lowest and "
                                               "highest colour in pictures (match the tokenizer's)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.dither > 0 and self.cache_dir is not None:
            raise ValueError("dither > 0 makes features random per read; it cannot be combined with cache_dir")
        if self.display_range[0] >= self.display_range[1]:
            raise ValueError(f"display_range {self.display_range} must be increasing")
        return self


def read_stats_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stats_file {str(path)!r} does not exist; compute it with "
                                f"`maeframe audio-stats RECIPE --write`")
    stats = json.loads(path.read_text())
    if not {"mean", "std"} <= set(stats):
        raise ValueError(f"stats_file {str(path)!r} holds no mean and std")
    return stats


class AudioDataset(Dataset):
    """Shared pipeline. Subclasses set `self.items` (list of (path, label)) and `self.classes` before
    calling `_setup()`; a label is a class index, a multi-hot float tensor, or -1 when unlabelled."""

    def __init__(self, options: AudioOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        if len(input_shape) != 3 or input_shape[0] != 1:
            raise ValueError(f"audio datasets produce [1, T, F] spectrograms; the tokenizer expects "
                             f"{list(input_shape)} (use the spectrogram tokenizer)")
        _, self.target_length, mel_bins = input_shape
        self.config = FbankConfig(num_mel_bins=mel_bins, sample_rate=options.sample_rate,
                                  frame_length_ms=options.frame_length_ms, frame_shift_ms=options.frame_shift_ms,
                                  window_type=options.window_type, remove_dc=options.remove_dc)
        self.mean, self.std = options.mean, options.std
        if options.stats_file is not None:
            stats = read_stats_file(options.stats_file)
            if stats.get("num_mel_bins", mel_bins) != mel_bins:
                raise ValueError(f"stats_file {options.stats_file!r} was computed for {stats['num_mel_bins']} "
                                 f"mel bins, the tokenizer has {mel_bins}")
            self.mean, self.std = float(stats["mean"]), float(stats["std"])
        self.scale = (2.0 if options.norm == "audiomae" else 1.0) * self.std
        self.pad_value = self.mean if options.pad_value is None else options.pad_value
        self.cache = FeatureCache(options.cache_dir, self.config) if options.cache_dir else None
        self.items: list[tuple[Path, int | Tensor]] = []
        self.classes: list[str] = []
        self.skipped: list[Path] = []
        self._problems: dict[Path, str] = {}
        self._unreadable: list[str] = []
        self._logged: set[Path] = set()

    # subclasses call this once self.items is filled
    def _setup(self, source: str) -> None:
        if self.options.limit:
            self.items = self.items[: self.options.limit]
        total = len(self.items)
        if total == 0:
            raise ValueError(f"{source}: no recordings found")
        good = []
        for path, label in self.items:
            problem = None if self.cache is not None and self.cache.has(path) else self._probe(path)
            if problem is None:
                good.append((path, label))
            else:
                self._skip(path, problem)
        self.items = good
        self.source, self.total = source, total
        self._unreadable = [f"{path}: {problem}" for path, problem in self._problems.items()]
        if not self.items:
            raise ValueError(f"{source}: no readable recordings")

    def _probe(self, path: Path) -> str | None:
        """Header check (no decoding): why `path` is unusable, or None."""
        try:
            info = sf.info(str(path))
        except Exception as err:
            return f"cannot read {path}: {type(err).__name__}: {err}"
        if info.frames <= 0 or info.samplerate <= 0:
            return f"{path} holds no samples"
        if info.frames * self.config.sample_rate < self.config.min_samples * info.samplerate:
            return f"{path} is shorter than one {self.config.frame_length_ms:g} ms frame"
        return None

    def _skip(self, path: Path, problem: str) -> None:
        self.skipped.append(path)
        self._problems[path] = problem
        if path not in self._logged:
            self._logged.add(path)
            log.warning("skipping %s", problem)

    def unreadable(self) -> list[str]:
        """Recordings whose header check failed at construction, with why (counted by the engine)."""
        return self._unreadable

    def __len__(self) -> int:
        return len(self.items)

    def features(self, index: int) -> Tensor:
        """Full-length log-mel fbank [frames, F] of recording `index` (no crop, pad or normalisation)."""
        path = self.items[index][0]
        if self.cache is not None:
            return self.cache.load(path)
        return audio_features(path, self.config, self.options.dither if self.train else 0.0)

    def _augment(self, features: Tensor) -> Tensor:
        shift = int(torch.randint(features.shape[0], ()))
        gain = torch.distributions.Beta(10.0, 10.0).sample() + 0.5
        return torch.roll(features, shift, dims=0) + 2 * torch.log(gain)

    def normalize(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.scale

    def spec_augment(self, features: Tensor) -> Tensor:
        """[T, F] log-mel -> the same with one frequency stripe (< freqm bins) and one time stripe (< timem
        frames) set to 0: torchaudio's masks on the [1, F, T] layout they expect."""
        import torchaudio.transforms as AT

        o = self.options
        x = features.T[None]
        if o.freqm:
            x = AT.FrequencyMasking(o.freqm)(x)
        if o.timem:
            x = AT.TimeMasking(o.timem)(x)
        return x[0].T

    def use_finetune_augment(self, rand_augment: str | None, random_erasing: float) -> None:
        """Image augmentations do not apply to spectrograms: SpecAugment is the dataset's freqm / timem."""
        raise ValueError(f"augment.rand_augment {rand_augment!r} / augment.random_erasing {random_erasing}: image "
                         f"augmentations are not applied to spectrograms; set rand_augment: null and "
                         f"random_erasing: 0, and use the audio dataset's freqm / timem (SpecAugment)")

    def describe(self, index: int) -> str:
        return str(self.items[index][0])

    @classmethod
    def item_repeats(cls, options: AudioOptions) -> int:
        """Repeated sampling: `repeats` augmented samples per decoded training recording."""
        return options.repeats

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        """([1, T, F] normalised log-mel, label); in training with `repeats` k > 1, ([k, 1, T, F], label): k
        samples of one decoded fbank, each with its own crop and augmentation draws. A recording that passed
        the header check but fails to decode raises AudioError after being counted in `skipped`; the
        engine's loader logs it once with its path, replaces it by another sample and enforces
        `data.max_bad_fraction`."""
        try:
            features = self.features(index)
        except AudioError:
            self.skipped.append(self.items[index][0])
            raise
        samples = [self._sample(features) for _ in range(self.repeats)]
        return (samples[0] if len(samples) == 1 else torch.stack(samples)), self.items[index][1]

    def _sample(self, features: Tensor) -> Tensor:
        """Full-length fbank [frames, F] -> one [1, T, F] sample: augment, crop or pad, SpecAugment, normalise."""
        if self.train and self.options.roll_gain:
            features = self._augment(features)
        features = fit_length(features, self.target_length, self.train, self.pad_value)
        if self.train and (self.options.freqm or self.options.timem):
            features = self.spec_augment(features)
        features = self.normalize(features)
        if self.train and self.options.noise:
            features = features + torch.rand_like(features) * torch.rand(()) / 10
            features = torch.roll(features, int(torch.randint(-10, 10, ())), dims=0)
        return features[None].float()

    @classmethod
    def file_suffixes(cls) -> tuple[str, ...]:
        return tuple(sorted(AUDIO_EXTENSIONS))

    @classmethod
    def from_files(cls, options: dict, input_shape: tuple[int, ...], paths: list[str],
                   labels: list[int] | None = None) -> Dataset:
        """The listed recordings: fbank settings and normalisation of `options`, the first T frames (padded)."""
        reader = AudioFilesReader(preprocessing_options(options, AudioOptions, READER_DROPS), input_shape, False)
        reader.items = [(Path(path), -1 if labels is None else labels[i]) for i, path in enumerate(paths)]
        problems = [problem for problem in (reader._probe(path) for path, _ in reader.items) if problem]
        if problems:  # asked-for files are not passed over
            raise ValueError("; ".join(problems))
        reader._setup("audio files")
        return reader

    def denormalize(self, batch: Tensor) -> Tensor:
        """Normalised batch -> [0, 1], log-mel `display_range` mapped linearly (for pictures)."""
        low, high = self.options.display_range
        return ((batch * self.scale + self.mean - low) / (high - low)).clamp(0, 1)


ALL_FILES = "**/*"


# options of a recipe's audio dataset that a reader of single files ignores
READER_DROPS = ("limit", "cache_dir", "repeats")


class AudioFilesReader(AudioDataset):
    """Exactly the given recordings (`AudioDataset.from_files`); files failing the header check are reported
    by `unreadable()`."""


def _audio_files(folder: Path, pattern: str, suffixes: set[str], passed: Counter) -> list[Path]:
    """The files below `folder` matching `pattern` with one of `suffixes`; the others are counted in `passed`
    by reason (outside the pattern, or their extension)."""
    matched = {p for p in folder.glob(pattern) if p.is_file()}
    if pattern != ALL_FILES:
        passed[f"outside the pattern {pattern!r}"] += sum(1 for p in folder.glob(ALL_FILES)
                                                           if p.is_file() and p not in matched)
    taken = sorted(p for p in matched if p.suffix.lower() in suffixes)
    passed.update(extension_reason(p) for p in matched if p.suffix.lower() not in suffixes)
    return taken


class AudioFolderOptions(AudioOptions):
    root: str = Field(description="folder with one sub-folder of recordings per class: root/<class>/...")
    pattern: str = Field(ALL_FILES, description="glob below each class folder selecting recordings "
                                                "(e.g. alpha/* for klettres letters only)")
    extensions: list[str] = Field(list(AUDIO_EXTENSIONS), description="file suffixes taken as recordings (default: "
                                  "every format the installed libsndfile reads, .opus included when it has Opus)")
    classes: list[str] | None = Field(None, description="class folders to use, in label order "
                                                        "(default: every folder holding recordings, sorted)")


class AudioFolderDataset(AudioDataset):
    """`root/<class>/**/<recording>` trees: label = index of the class folder in `classes`."""

    Options = AudioFolderOptions

    def __init__(self, options: AudioFolderOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"audio_folder: root {str(root)!r} is not a directory")
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in options.extensions}
        passed: Counter = Counter({OUTSIDE_CLASSES: sum(1 for p in root.iterdir() if p.is_file())})
        folders = {p.name: _audio_files(p, options.pattern, suffixes, passed)
                   for p in sorted(root.iterdir()) if p.is_dir()}
        if options.classes is not None:
            missing = [c for c in options.classes if not folders.get(c)]
            if missing:
                raise ValueError(f"audio_folder: classes without recordings under {root}: {missing}")
            self.classes = list(options.classes)
            passed["in class folders not listed in `classes`"] += sum(
                len(files) for name, files in folders.items() if name not in self.classes)
        else:
            self.classes = [name for name, files in folders.items() if files]
        self.items = [(path, label) for label, name in enumerate(self.classes) for path in folders[name]]
        log_passed_over("audio_folder", root, passed, taken="the suffixes in the `extensions` option",
                        chosen=(*(r for r in passed if r.startswith("outside the pattern")),
                                "in class folders not listed in `classes`"))
        self._setup(f"audio_folder {root}")


class AudioCsvOptions(AudioOptions):
    csv: str = Field(description="CSV file with a header row; one recording per row")
    root: str | None = Field(None, description="folder that relative paths are read from (default: the CSV's)")
    path_column: str = Field("path", description="column holding the recording's path")
    labels_column: str | None = Field("labels", description="column holding the label(s); null = unlabelled (-1)")
    label_separator: str = Field(";", min_length=1, description="separates the labels of one row: "
                                 "'a;b', or ',' for AudioSet-style quoted lists \"a,b\"")
    multi_label: bool = Field(False, description="labels are multi-hot float vectors over `classes` (AudioSet); "
                                                 "false: exactly one label per row, a class index (ESC-50)")
    classes: list[str] | None = Field(None, description="label names in index order (default: sorted labels of "
                                                        "this CSV); give it so train and eval splits agree")
    where: dict[str, list[str]] = Field(default_factory=dict, description="keep rows whose column value is one "
                                        "of the listed ones, e.g. {fold: ['1', '2', '3', '4']} for ESC-50")


class AudioCsvDataset(AudioDataset):
    """Recordings listed in a CSV (`path,labels`), single-label (class index) or multi-label (multi-hot)."""

    Options = AudioCsvOptions

    def __init__(self, options: AudioCsvOptions, input_shape: tuple[int, ...], train: bool):
        import csv

        super().__init__(options, input_shape, train)
        table = Path(options.csv).expanduser()
        if not table.is_file():
            raise FileNotFoundError(f"audio_csv: {str(table)!r} does not exist")
        base = Path(options.root).expanduser() if options.root else table.parent
        with open(table, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            columns = [options.path_column, *([options.labels_column] if options.labels_column else []),
                       *options.where]
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"audio_csv: {table} has no column(s) {absent}; columns: {reader.fieldnames}")
            rows = [row for row in reader
                    if all(row[column] in values for column, values in options.where.items())]
        names = [self._split(row, i) for i, row in enumerate(rows, start=2)] if options.labels_column else None
        if names is not None:
            found = sorted({name for row in names for name in row})
            self.classes = list(options.classes) if options.classes is not None else found
            unknown = sorted(set(found) - set(self.classes))
            if unknown:
                raise ValueError(f"audio_csv: labels not in classes: {unknown[:10]}")
        index = {name: i for i, name in enumerate(self.classes)}
        for i, row in enumerate(rows):
            path = Path(row[options.path_column])
            path = path if path.is_absolute() else base / path
            if names is None:
                label: int | Tensor = -1
            elif options.multi_label:
                label = torch.zeros(len(self.classes))
                label[[index[name] for name in names[i]]] = 1.0
            else:
                label = index[names[i][0]]
            self.items.append((path, label))
        self._setup(f"audio_csv {table}")

    def _split(self, row: dict, line: int) -> list[str]:
        o = self.options
        names = [name.strip() for name in (row[o.labels_column] or "").split(o.label_separator) if name.strip()]
        if not names:
            raise ValueError(f"audio_csv: line {line} has no label")
        if not o.multi_label and len(names) != 1:
            raise ValueError(f"audio_csv: line {line} has {len(names)} labels {names}; set multi_label: true")
        return names


class KlettresOptions(AudioOptions):
    root: str = Field(KLETTRES_ROOT, description="klettres-data folder: <lang>/{alpha,syllab}/*.ogg")
    languages: list[str] | None = Field(None, description="language folders to use, e.g. [en, fr, de] "
                                                          "(default: all 20 with recordings)")
    kinds: list[Literal["alpha", "syllab"]] = Field(["alpha", "syllab"], min_length=1,
                                                    description="letters (alpha), syllables (syllab), or both")
    label: Literal["language", "sound"] = Field("language", description="language: the language folder; "
                                                "sound: the letter/syllable name from <lang>/sounds.xml (e.g. "
                                                "'A', 'BA'), shared by languages that use the same name")
    split: Literal["all", "train", "test"] = Field("all", description="all recordings, or a fixed split: "
                                                   "every `test_every`-th file of each language is test")
    test_every: int = Field(5, ge=2, description="1 in test_every recordings per language goes to the test split")

    @field_validator("languages")
    @classmethod
    def _non_empty(cls, value):
        if value is not None and not value:
            raise ValueError("languages must name at least one language (or be null for all)")
        return value


def klettres_sound_names(root: Path, language: str) -> dict[str, str]:
    """{file path relative to root: sound name} from `<root>/<language>/sounds.xml` ({} if absent)."""
    table = root / language / "sounds.xml"
    if not table.is_file():
        return {}
    return {sound.get("file"): sound.get("name") for sound in ElementTree.parse(table).getroot().iter("sound")}


class KlettresDataset(AudioDataset):
    """KLettres spoken letters and syllables (Debian `klettres-data`, ~1.8k ogg files in 20 languages,
    0.2-7.6 s, mostly 44.1 kHz, mono and stereo). Label = language index by default."""

    Options = KlettresOptions

    def __init__(self, options: KlettresOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"klettres: {root} not found; {KLETTRES_HINT}")
        by_language = {lang.name: sorted(p for kind in options.kinds for p in (lang / kind).glob("*.ogg"))
                       for lang in sorted(root.iterdir()) if lang.is_dir()}
        by_language = {name: files for name, files in by_language.items() if files}
        languages = options.languages if options.languages is not None else list(by_language)
        missing = [name for name in languages if name not in by_language]
        if missing:
            raise ValueError(f"klettres: no {'/'.join(options.kinds)} recordings for {missing}; "
                             f"available: {sorted(by_language)}")
        chosen: list[tuple[Path, str]] = []
        for name in languages:
            files = by_language[name]
            if options.split != "all":
                test = options.split == "test"
                files = [f for i, f in enumerate(files) if (i % options.test_every == options.test_every - 1) == test]
            if options.label == "language":
                chosen += [(f, name) for f in files]
            else:
                names = klettres_sound_names(root, name)
                chosen += [(f, names.get(str(f.relative_to(root)), f.stem).upper()) for f in files]
        self.classes = list(languages) if options.label == "language" else sorted({n for _, n in chosen})
        index = {name: i for i, name in enumerate(self.classes)}
        self.items = [(path, index[name]) for path, name in chosen]
        self._setup(f"klettres {root}")


# --- statistics (`maeframe audio-stats`) ------------------------------------------------------------------


@hookimpl
def register_datasets(register):
    register("audio_folder", AudioFolderDataset)
    register("audio_csv", AudioCsvDataset)
    register("klettres", KlettresDataset)
