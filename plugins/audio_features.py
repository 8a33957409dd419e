"""Audio features of the audio datasets: decoding with soundfile (every format the installed libsndfile reads),
resampling to 16 kHz, Kaldi fbank (AudioMAE's 128 mel bins, 25 ms / 10 ms, hanning), cropping or padding to a
length, and the on-disk feature cache."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor



AUDIOSET_MEAN = -4.2677393  # AudioMAE / AST statistics of 128-bin fbank over AudioSet
AUDIOSET_STD = 4.5689974
DISPLAY_RANGE = (-16.0, 8.0)  # log-mel values drawn as 0 and 1 in pictures (floor log(eps) ≈ -15.9)
# File suffixes of each libsndfile major format (`soundfile.available_formats()`). soundfile identifies a file
# by its header, not its name; these select the files a folder dataset tries. Left out: RAW (no header: rate,
# channels and sample type would have to be given), MAT4/MAT5 (.mat is mostly MATLAB data, not sound) and
# MPC2K (.mpc is mostly Musepack, which libsndfile does not read).
SOUNDFILE_SUFFIXES = {
    "WAV": (".wav", ".wave"), "WAVEX": (".wav", ".wave"), "FLAC": (".flac",), "OGG": (".ogg", ".oga"), "MP3": (".mp3",),
    "AIFF": (".aif", ".aiff", ".aifc"), "AU": (".au", ".snd"), "CAF": (".caf",), "W64": (".w64",),
    "RF64": (".rf64",), "NIST": (".nist", ".sph"), "VOC": (".voc",), "IRCAM": (".sf", ".ircam"),
    "AVR": (".avr",), "PAF": (".paf",), "SVX": (".svx", ".8svx"), "HTK": (".htk",), "PVF": (".pvf",),
    "SD2": (".sd2",), "SDS": (".sds",), "XI": (".xi",), "WVE": (".wve",),
}


def decodable_suffixes() -> tuple[str, ...]:
    """The suffixes of every format the installed libsndfile reads (Opus in Ogg when it has the codec)."""
    formats = sf.available_formats()
    suffixes = [suffix for name, found in SOUNDFILE_SUFFIXES.items() if name in formats for suffix in found]
    if "OGG" in formats and "OPUS" in sf.available_subtypes("OGG"):
        suffixes.append(".opus")
    return tuple(dict.fromkeys(suffixes))


AUDIO_EXTENSIONS = decodable_suffixes()


class AudioError(Exception):
    """A recording that cannot be turned into features (unreadable, empty, too short)."""


# --- features --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FbankConfig:
    """Everything that determines the fbank of a file; its `key` names cache entries."""

    num_mel_bins: int = 128
    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hanning"
    remove_dc: bool = True

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def min_samples(self) -> int:
        """Samples (at `sample_rate`) of one analysis window: shorter recordings give no frame."""
        return int(self.sample_rate * self.frame_length_ms / 1000)


def load_audio(path: str | Path) -> tuple[Tensor, int]:
    """Decode a file with soundfile: (mono waveform [1, S] float32 in [-1, 1], sample rate). Channels are
    averaged. Raises AudioError for files soundfile cannot read or that hold no samples."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, EOFError, ... by format
        raise AudioError(f"cannot decode {path}: {type(err).__name__}: {err}") from err
    if data.shape[0] == 0:
        raise AudioError(f"{path} holds no samples")
    return torch.from_numpy(data).mean(dim=1)[None], int(rate)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio.transforms

    return torchaudio.transforms.Resample(orig, new, dtype=torch.float32)  # float32 kernel, as functional's


def resample(waveform: Tensor, orig: int, new: int) -> Tensor:
    """[C, S] float32 at `orig` Hz -> [C, S'] at `new` Hz: equal to `torchaudio.functional.resample` with
    its defaults, but the kernel is built once per rate pair (10× faster for 44.1 -> 16 kHz)."""
    if orig == new:
        return waveform
    return _resampler(orig, new)(waveform)


def kaldi_fbank(waveform: Tensor, config: FbankConfig, dither: float = 0.0) -> Tensor:
    """Mono waveform [1, S] at config.sample_rate -> log-mel fbank [frames, num_mel_bins] (AudioMAE's call)."""
    from torchaudio.compliance import kaldi

    if config.remove_dc:
        waveform = waveform - waveform.mean()
    return kaldi.fbank(waveform, htk_compat=True, sample_frequency=config.sample_rate, use_energy=False,
                       window_type=config.window_type, num_mel_bins=config.num_mel_bins, dither=dither,
                       frame_length=config.frame_length_ms, frame_shift=config.frame_shift_ms)


def audio_features(path: str | Path, config: FbankConfig, dither: float = 0.0) -> Tensor:
    """File -> fbank [frames, num_mel_bins] float32: decode, mono, resample, fbank. AudioError when the
    file cannot be read or is shorter than one analysis window."""
    waveform, rate = load_audio(path)
    waveform = resample(waveform, rate, config.sample_rate)
    if waveform.shape[1] < config.min_samples:
        raise AudioError(f"{path} is shorter than one {config.frame_length_ms:g} ms frame "
                         f"({waveform.shape[1]} samples at {config.sample_rate} Hz)")
    features = kaldi_fbank(waveform, config, dither)
    if not torch.isfinite(features).all():
        raise AudioError(f"{path} gives non-finite features")
    return features


def fit_length(features: Tensor, length: int, train: bool, pad_value: float) -> Tensor:
    """[frames, F] -> [length, F]: crop longer inputs (a uniformly random window when `train`, drawn from
    torch's global generator; the start otherwise) and pad shorter ones at the end with `pad_value`."""
    frames = features.shape[0]
    if frames > length:
        start = int(torch.randint(frames - length + 1, ())) if train else 0
        return features[start:start + length]
    if frames < length:
        pad = features.new_full((length - frames, features.shape[1]), pad_value)
        return torch.cat([features, pad])
    return features


class FeatureCache:
    """One .npy per (file path, size, mtime, fbank options): written once, atomically, read on later epochs.

    Entries live in `root/<2 hex>/<32 hex>.npy`; a changed file (new mtime or size) or a change of the
    fbank options gets a new key, so stale entries are never read (delete the folder to reclaim space).
    """

    def __init__(self, root: str | Path, config: FbankConfig):
        self.root = Path(root).expanduser()
        self.config = config
        self.hits = self.misses = 0

    def entry(self, path: str | Path) -> Path:
        stat = os.stat(path)
        ident = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.config.key}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}.npy"

    def has(self, path: str | Path) -> bool:
        try:
            return self.entry(path).is_file()
        except OSError:
            return False

    def load(self, path: str | Path) -> Tensor:
        """Features of `path`, from the cache when present, else computed and stored."""
        try:
            entry = self.entry(path)
        except OSError as err:
            raise AudioError(f"cannot read {path}: {err}") from err
        try:
            features = torch.from_numpy(np.load(entry))
        except (OSError, ValueError, EOFError):  # absent, or unreadable: recompute and overwrite
            features = audio_features(path, self.config)
            self.misses += 1
            self._store(entry, features)
            return features
        self.hits += 1
        return features

    def _store(self, entry: Path, features: Tensor) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, features.numpy())
            os.replace(tmp, entry)  # atomic: readers see the old state or the complete file
        finally:
            tmp.unlink(missing_ok=True)


# --- datasets --------------------------------------------------------------------------------------------
