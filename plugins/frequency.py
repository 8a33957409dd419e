"""Frequency-domain targets: per-patch FFT amplitude/phase and low/high-pass bands.

Each patch is transformed per channel (and, for video tubelets, per frame) with a 2-D FFT over its two
spatial axes, `torch.fft.rfft2(..., norm="ortho")` (orthonormal: Σ x² equals the spectrum's energy, with the
half-spectrum's non-self-conjugate columns counted twice).

* `amplitude`: |X| of the rfft2 half-spectrum, optionally log1p(|X|).
* `amplitude_phase`: the amplitudes followed by the phases angle(X) in (-π, π]; the phase is set to 0 where
  the amplitude is below `phase_floor` (it is undefined there and would be rounding noise).
* `lowpass` / `highpass`: the patch filtered to the frequencies whose normalised radius
  r = sqrt(fy² + fx²) / 0.5 (fy, fx in cycles per pixel, 0.5 = Nyquist; r ≤ 1 on the axes, up to √2 in the
  corners) is ≤ `cutoff` (lowpass) or > `cutoff` (highpass), back in pixel space. The two bands are
  complementary: lowpass + highpass = the patch exactly, up to float rounding.

With `norm_pix` each patch is first normalised by its own mean and unbiased variance over all its values,
as the pixel target's norm_pix does (so the DC term then only carries per-channel offsets from the patch
mean). Arithmetic is fp32 with autocast disabled. No target here can be drawn as a picture of the image:
`reconstruct` returns None.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Mask, Options, Target, TargetOut, Tokenizer, Tokens, hookimpl

_AMPLITUDE = ("amplitude", "amplitude_phase")


class FrequencyOptions(Options):
    mode: Literal["amplitude", "amplitude_phase", "lowpass", "highpass"] = Field(
        "amplitude", description="amplitude: rfft2 magnitudes; amplitude_phase: magnitudes then phases; "
                                 "lowpass/highpass: the patch band-filtered at `cutoff`, in pixel space")
    log: bool = Field(False, description="amplitude modes: use log1p(amplitude)")
    phase_floor: float = Field(1e-5, ge=0, description="amplitude_phase: phase is 0 where the amplitude is "
                                                       "below this (undefined there)")
    cutoff: float = Field(0.5, ge=0, le=1, description="lowpass/highpass: radius (fraction of Nyquist) "
                                                       "separating kept from removed frequencies")
    norm_pix: bool = Field(False, description="normalise each patch by its own mean and variance before "
                                              "the transform")
    eps: float = Field(1e-6, gt=0, description="norm_pix: added to the per-patch variance before the "
                                               "square root")

    @model_validator(mode="after")
    def _mode_options(self) -> FrequencyOptions:
        if self.mode in _AMPLITUDE and "cutoff" in self.model_fields_set:
            raise ValueError(f"cutoff does not apply to mode {self.mode}")
        if self.mode not in _AMPLITUDE and "log" in self.model_fields_set:
            raise ValueError(f"log does not apply to mode {self.mode}")
        if self.mode != "amplitude_phase" and "phase_floor" in self.model_fields_set:
            raise ValueError(f"phase_floor does not apply to mode {self.mode}")
        return self


def band_mask(p: int, q: int, cutoff: float, low: bool, device: torch.device) -> Tensor:
    """[p, q//2 + 1] float mask over the rfft2 half-spectrum: 1 where the normalised radius is ≤ cutoff
    (low) or > cutoff (not low)."""
    fy = torch.fft.fftfreq(p, device=device).abs() / 0.5
    fx = torch.fft.rfftfreq(q, device=device) / 0.5
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    keep = radius <= cutoff if low else radius > cutoff
    return keep.float()


class FrequencyTarget(Target):
    """values [B, N, out_dim] float32.

    Patches [B, N, patch_dim] are laid out (*patch_size, C) with patch_size (p, q) or, for tubelets, (t, p, q).
    amplitude: out_dim = t·C·p·(q//2+1), layout (t, C, p, q//2+1); amplitude_phase: twice that, amplitudes
    first; lowpass/highpass: out_dim = patch_dim, in the patches' own layout.
    """

    Options = FrequencyOptions

    def __init__(self, options: FrequencyOptions, tokenizer: Tokenizer):
        super().__init__(options, tokenizer)
        if len(tokenizer.spec.patch_size) not in (2, 3):
            raise ValueError(f"frequency target needs 2-D patches or 3-D tubelets, got patch size "
                             f"{tokenizer.spec.patch_size}")

    @property
    def out_dim(self) -> int:
        spec = self.tokenizer.spec
        if self.options.mode not in _AMPLITUDE:
            return spec.patch_dim
        p, q = spec.patch_size[-2:]
        per_part = math.prod(spec.patch_size[:-2]) * spec.channels * p * (q // 2 + 1)
        return per_part * (2 if self.options.mode == "amplitude_phase" else 1)

    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        """tokens.patches [B, N, patch_dim] -> values [B, N, out_dim] (mask unused)."""
        spec, o = self.tokenizer.spec, self.options
        patches = tokens.patches
        with torch.autocast(patches.device.type, enabled=False):
            x = patches.float()
            if o.norm_pix:
                x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + o.eps).sqrt()
            b, n, _ = x.shape
            p, q = spec.patch_size[-2:]
            grid = x.view(b, n, *spec.patch_size, spec.channels).movedim(-1, -3)  # [B, N, (t,) C, p, q]
            spectrum = torch.fft.rfft2(grid, norm="ortho")                        # [B, N, (t,) C, p, q//2+1]
            if o.mode in _AMPLITUDE:
                amplitude = spectrum.abs()
                parts = [torch.log1p(amplitude) if o.log else amplitude]
                if o.mode == "amplitude_phase":
                    parts.append(torch.where(amplitude < o.phase_floor, 0.0, spectrum.angle()))
                values = torch.cat([part.reshape(b, n, -1) for part in parts], dim=-1)
            else:
                keep = band_mask(p, q, o.cutoff, o.mode == "lowpass", x.device)
                band = torch.fft.irfft2(spectrum * keep, s=(p, q), norm="ortho")
                values = band.movedim(-3, -1).reshape(b, n, -1)
        return TargetOut(values)


@hookimpl
def register_targets(register):
    register("frequency", FrequencyTarget)
