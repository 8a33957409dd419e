"""Spectrogram tokenizer: [B, 1, T, F] log-mel fbank <-> [B, (T/pt)·(F/pf), pt·pf] patches (AudioMAE layout).

Grid axis 0 is time and axis 1 is frequency, so token n sits at time row n // (F/pf) and frequency column
n % (F/pf) — the layout the `time_freq` masker and the core's 2-D sin-cos position embedding expect.
Reconstruction pictures are drawn as spectrograms (time left to right, low frequencies at the bottom);
optionally the original and the reconstruction of the first samples are written as Griffin-Lim audio.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Mask, Options, Tokenizer, Tokens, TokenSpec, as_pair, hookimpl

from .audio_data import DISPLAY_RANGE

PICTURE_MIN_HEIGHT = 112  # spectrograms with fewer mel bins are enlarged (nearest) for viewing
HIDDEN_GREY = (200, 200, 200)
COLUMNS = ("original", "masked", "reconstruction", "recon. + visible")


class SpectrogramOptions(Options):
    target_length: int = Field(1024, gt=0, description="time frames T per sample (1024 × 10 ms ≈ 10 s)")
    num_mel_bins: int = Field(128, gt=0, description="mel bins F per frame")
    patch_size: int | tuple[int, int] = Field(16, description="patch extent (time frames, mel bins); "
                                                              "one int = square; must divide T and F")
    colormap: str = Field("magma", description="matplotlib colormap of the reconstruction pictures")
    audio_samples: int = Field(0, ge=0, description="write original and reconstruction of the first N samples "
                                                    "of each picture as Griffin-Lim wav files (0 = none; `maeframe reconstruct` "
                                                    "writes them for every input anyway)")
    display_range: tuple[float, float] = Field(DISPLAY_RANGE, description="log-mel values of picture colours 0 "
                                               "and 1; must match the dataset's display_range (for audio only)")
    sample_rate: int = Field(16000, gt=0, description="sample rate of the fbank (for audio only)")
    frame_length_ms: float = Field(25.0, gt=0, description="fbank window in ms (for audio only)")
    frame_shift_ms: float = Field(10.0, gt=0, description="fbank hop in ms (for audio only)")
    griffin_lim_iters: int = Field(32, gt=0, description="Griffin-Lim iterations (for audio only)")

    @property
    def pt_pf(self) -> tuple[int, int]:
        return as_pair(self.patch_size)

    @model_validator(mode="after")
    def _patch_divides_input(self) -> SpectrogramOptions:
        for axis, n, p in zip(("time", "frequency"), (self.target_length, self.num_mel_bins), self.pt_pf):
            if p <= 0 or n % p:
                raise ValueError(f"patch {axis} size {p} does not divide the {axis} axis {n}")
        return self


class SpectrogramTokenizer(Tokenizer):
    """Non-overlapping pt×pf patches in row-major (time-major) grid order, each flattened as (pt, pf, 1)."""

    Options = SpectrogramOptions

    def __init__(self, options: SpectrogramOptions):
        super().__init__(options)
        (pt, pf), t, f = options.pt_pf, options.target_length, options.num_mel_bins
        self._spec = TokenSpec(grid=(t // pt, f // pf), patch_size=(pt, pf), channels=1)

    @property
    def spec(self) -> TokenSpec:
        return self._spec

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.options.target_length, self.options.num_mel_bins)

    def tokenize(self, batch: Tensor) -> Tokens:
        """batch [B, 1, T, F] -> Tokens(patches [B, (T/pt)·(F/pf), pt·pf])."""
        if tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"spectrogram tokenizer expects [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(batch.shape)}")
        b = batch.shape[0]
        (gt, gf), (pt, pf) = self._spec.grid, self._spec.patch_size
        x = batch.reshape(b, gt, pt, gf, pf).permute(0, 1, 3, 2, 4)
        return Tokens(patches=x.reshape(b, gt * gf, pt * pf), source=batch)

    def untokenize(self, patches: Tensor) -> Tensor:
        """patches [B, (T/pt)·(F/pf), pt·pf] -> [B, 1, T, F]."""
        b = patches.shape[0]
        (gt, gf), (pt, pf) = self._spec.grid, self._spec.patch_size
        x = patches.reshape(b, gt, gf, pt, pf).permute(0, 1, 3, 2, 4)
        return x.reshape(b, 1, gt * pt, gf * pf)

    # --- pictures and audio ------------------------------------------------------------------------------

    def save_pictures(self, panels: Tensor, path: Path, mask: Mask | None = None, *,
                      playable: bool = False) -> list[Path]:
        """panels [B, 4, 1, T, F] in [0, 1] -> one PNG: a row per sample, the four panels side by side, each
        a spectrogram with time to the right and low frequencies at the bottom; plus `audio_samples` × 2 wavs
        (`<stem>-<i>-original.wav`, `<stem>-<i>-reconstruction.wav`, the latter with visible patches pasted),
        for every sample when `playable` (`maeframe reconstruct`); the `mask`'s hidden patches are drawn grey
        in the masked panel."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hidden = None
        if mask is not None:  # the hidden patches of the "masked" panel are drawn grey
            spread = mask.masked.unsqueeze(-1).expand(-1, -1, self.spec.patch_dim).contiguous()
            hidden = self.untokenize(spread) > 0
        spectrogram_grid(panels, self.options.colormap, hidden).save(path)
        written = [path]
        sounds = panels.shape[0] if playable else min(self.options.audio_samples, panels.shape[0])
        for i in range(sounds):
            for column, kind in ((0, "original"), (3, "reconstruction")):
                wav = path.with_name(f"{path.stem}-{i}-{kind}.wav")
                self.write_audio(panels[i, column, 0], wav)
                written.append(wav)
        return written

    def write_audio(self, picture: Tensor, path: Path) -> None:
        """One panel [T, F] in [0, 1] -> 16-bit wav via log-mel -> linear power -> Griffin-Lim."""
        import soundfile as sf

        low, high = self.options.display_range
        waveform = griffin_lim_from_fbank(low + picture.float() * (high - low), self.options.sample_rate,
                                          self.options.frame_length_ms, self.options.frame_shift_ms,
                                          self.options.griffin_lim_iters)
        sf.write(str(path), waveform.numpy(), self.options.sample_rate, subtype="PCM_16")


def spectrogram_grid(panels: Tensor, colormap: str = "magma", hidden: Tensor | None = None):
    """panels [B, K, 1, T, F] in [0, 1] -> PIL image: rows of K coloured spectrograms with a header.
    `hidden` [B, 1, T, F] bool marks the hidden patches of panel 1, drawn in light grey."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    b, k, _, t, f = panels.shape
    scale = max(1, math.ceil(PICTURE_MIN_HEIGHT / f))
    images = panels[:, :, 0].transpose(-1, -2).flip(-2).clamp(0, 1)     # [B, K, F, T], low bins at the bottom
    rgb = (colormaps[colormap](images.numpy())[..., :3] * 255).astype(np.uint8)
    if hidden is not None:
        rgb[:, 1][hidden[:, 0].transpose(-1, -2).flip(-2).numpy()] = HIDDEN_GREY
    rgb = rgb.repeat(scale, axis=2).repeat(scale, axis=3)               # [B, K, F·s, T·s, 3]
    height, width, pad, header = f * scale, t * scale, 2, 14
    canvas = np.full((header + b * (height + pad), k * (width + pad), 3), 255, np.uint8)
    for i in range(b):
        for j in range(k):
            top, left = header + i * (height + pad), j * (width + pad)
            canvas[top:top + height, left:left + width] = rgb[i, j]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for j in range(k):
        draw.text((j * (width + pad) + 2, 1), COLUMNS[j] if j < len(COLUMNS) else str(j), fill=(0, 0, 0))
    return picture


def griffin_lim_from_fbank(log_mel: Tensor, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                           frame_shift_ms: float = 10.0, iters: int = 32) -> Tensor:
    """Kaldi log-mel fbank [T, F] -> waveform [S] in [-0.9, 0.9]: mel power mapped back to linear power
    with the pseudo-inverse of Kaldi's mel filterbank, then Griffin-Lim phase recovery (seeded, so
    drawing pictures does not disturb the training RNG). A listening aid, not an exact inverse."""
    import torchaudio.functional as AF
    from torchaudio.compliance import kaldi

    window = int(sample_rate * frame_length_ms / 1000)
    hop = int(sample_rate * frame_shift_ms / 1000)
    n_fft = 1 << (window - 1).bit_length()
    banks, _ = kaldi.get_mel_banks(log_mel.shape[1], n_fft, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = torch.nn.functional.pad(banks, (0, 1))                      # [F, n_fft/2 + 1], as fbank pads
    power = (log_mel.double().exp() @ torch.linalg.pinv(banks.double()).T).clamp(min=0)  # [T, n_fft/2 + 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        waveform = AF.griffinlim(power.sqrt().T.float(), torch.hann_window(window), n_fft, hop, window,
                                 power=1.0, n_iter=iters, momentum=0.99, length=None, rand_init=True)
    return 0.9 * waveform / waveform.abs().max().clamp(min=1e-8)


@hookimpl
def register_tokenizers(register):
    register("spectrogram", SpectrogramTokenizer)
