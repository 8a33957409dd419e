"""The per-sample work of the official AudioMAE pretraining loader, rebuilt for benchmarks/av_loader.py.

Rebuilt from the published code of facebookresearch/AudioMAE (`dataset.AudiosetDataset` with the audio_conf
of `main_pretrain.py` for AudioSet and `--roll_mag_aug True` as its pretraining script passes), written here
from its description, not copied. Every read of an item, every epoch:

1. decode the file with `torchaudio.load` (torchaudio >= 2.9 decodes through torchcodec; without it the
   rebuild reads with soundfile, what torchaudio's older backends did), the file's own rate (AudioSet: 16 kHz);
2. subtract the waveform mean; roll + magnitude: `np.roll` by a draw in [0, len(waveform)) — len of the
   [1, S] waveform is 1, so the official roll is always 0 — and scale by Beta(10, 10) + 0.5;
3. `torchaudio.compliance.kaldi.fbank` (htk_compat, no energy, hanning, 128 mel bins, dither 0, 10 ms
   shift) — the expensive step, recomputed on every read;
4. zero-pad or cut to 1024 frames; build the SpecAugment modules (freqm = timem = 0 in pretraining: not
   applied); normalise (x - mean) / (2·std) with AudioSet's statistics;
5. a multi-hot label vector of 527 classes.

Returns (fbank [1, 1024, 128] float32, label [527] float32, path), as the official dataset does.
"""
from __future__ import annotations

import numpy as np
import torch

AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


def load_waveform(path: str, reader: str = "torchaudio") -> tuple[torch.Tensor, int, str]:
    """(waveform [channels, S] float32, rate, which reader): torchaudio.load when it works here (and `reader`
    is "torchaudio"), else soundfile."""
    if reader == "torchaudio":
        try:
            import torchaudio

            waveform, rate = torchaudio.load(path)
            return waveform, rate, "torchaudio.load"
        except Exception:  # torchaudio >= 2.9 without torchcodec cannot load
            pass
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), rate, "soundfile"


class OfficialAudioMAEPretrainData(torch.utils.data.Dataset):
    """AudioMAE's AudiosetDataset for pretraining on a list of (path, class index) (see the module docstring)."""

    def __init__(self, items: list[tuple[str, int]], target_length: int = 1024, mel_bins: int = 128,
                 num_classes: int = 527, roll_mag_aug: bool = True, freqm: int = 0, timem: int = 0,
                 reader: str = "torchaudio"):
        self.items, self.target_length, self.mel_bins = items, target_length, mel_bins
        self.num_classes, self.roll_mag_aug, self.freqm, self.timem = num_classes, roll_mag_aug, freqm, timem
        self.reader = reader  # "torchaudio" (as the official code) or "soundfile" (what maeframe decodes with)

    def __len__(self) -> int:
        return len(self.items)

    def roll_mag(self, waveform: torch.Tensor) -> torch.Tensor:
        array = waveform.numpy()
        shift = np.random.randint(len(array))
        return torch.Tensor(np.roll(array, shift) * (np.random.beta(10, 10) + 0.5))

    def fbank(self, path: str) -> torch.Tensor:
        from torchaudio.compliance import kaldi

        waveform, rate, _ = load_waveform(path, self.reader)
        waveform = waveform - waveform.mean()
        if self.roll_mag_aug:
            waveform = self.roll_mag(waveform)
        features = kaldi.fbank(waveform, htk_compat=True, sample_frequency=rate, use_energy=False,
                               window_type="hanning", num_mel_bins=self.mel_bins, dither=0.0, frame_shift=10)
        missing = self.target_length - features.shape[0]
        if missing > 0:
            return torch.nn.ZeroPad2d((0, 0, 0, missing))(features)
        return features[: self.target_length]

    def __getitem__(self, index: int):
        import torchaudio

        path, label = self.items[index]
        features = self.fbank(path)
        target = torch.zeros(self.num_classes)
        target[label] = 1.0
        freq_mask = torchaudio.transforms.FrequencyMasking(self.freqm)   # built on every read, as the official code
        time_mask = torchaudio.transforms.TimeMasking(self.timem)
        features = features.transpose(0, 1).unsqueeze(0)                           # [1, F, T]
        if self.freqm:
            features = freq_mask(features)
        if self.timem:
            features = time_mask(features)
        features = features.squeeze(0).transpose(0, 1)
        features = (features - AUDIOSET_MEAN) / (AUDIOSET_STD * 2)
        return features.unsqueeze(0), target, path
