"""Audio-visual pairs from CAV-MAE's datafiles (`cav_mae_json`): AudioSet / VGGSound clips as one audio file and
frames extracted in advance, for paired joint pretraining.

The datafile is the JSON CAV-MAE's preprocessing writes (src/preprocess/create_json_*.py in YuanGongND/cav-mae):
    {"data": [{"video_id": "...", "wav": "/.../audio/ID.flac", "video_path": "/.../frames/",
               "labels": "/m/09x0r,/m/05zppz"}, ...]}
and frame k (0 <= k < frames) of a clip is `<video_path>/frame_<k>/<video_id>.jpg`. Labels are the `mid`
column of a `label_csv` (index,mid,display_name: AudioSet's class_labels_indices.csv), multi-hot; without
a label_csv samples are unlabelled (-1).

* audio: the fbank pipeline of `audio_data.py` (every AudioOptions field applies: CAV-MAE normalises with
  (x - mean) / std, norm `standard`, AudioSet mean -5.081, std 4.4849);
* visual: one frame, as CAV-MAE pretrains: a random one of the `frames` in training (from torch's global
  generator, which the engine seeds per sample), the middle one in evaluation; when that frame file is
  missing the next lower one is used (as CAV-MAE's loader does). Resized (bicubic) so the short side is the
  tokenizer's size, centre-cropped and normalised with ImageNet's mean/std -- CAV-MAE's only image transform.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from pydantic import Field, model_validator
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import v2

from maeframe import Dataset, hookimpl

from .audio_data import AudioDataset, AudioOptions
from .image_decode import DecodeOptions, decode
from .spoken_letters import denormalize_by_shape


class AvFramesOptions(AudioOptions, DecodeOptions):
    datafile: str = Field(description="CAV-MAE datafile: JSON {\"data\": [{video_id, wav, video_path, labels}]}")
    label_csv: str | None = Field(None, description="index,mid,display_name CSV naming the classes (AudioSet's "
                                                    "class_labels_indices.csv); null = unlabelled")
    frames: int = Field(10, ge=1, description="frames extracted per clip, frame_0 .. frame_<frames-1> "
                                              "(CAV-MAE: 10)")
    audio_modality: str = Field("audio", min_length=1, description="modality name of the spectrogram in samples")
    visual_modality: str = Field("visual", min_length=1, description="modality name of the frame in samples")
    visual_mean: tuple[float, ...] = Field(IMAGENET_DEFAULT_MEAN, description="frame normalisation mean per channel")
    visual_std: tuple[float, ...] = Field(IMAGENET_DEFAULT_STD, description="frame normalisation std per channel")

    @model_validator(mode="after")
    def _paired(self):
        if self.audio_modality == self.visual_modality:
            raise ValueError(f"audio_modality and visual_modality are both {self.audio_modality!r}")
        if self.repeats != 1:
            raise ValueError("repeats > 1 (repeated sampling) is not supported for paired samples")
        return self


def read_label_csv(path: Path) -> list[tuple[str, str]]:
    """[(mid, display name)] in index order."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"cav_mae_json: {path} is not an index,mid,display_name CSV")
    return [(row["mid"], row["display_name"]) for row in sorted(rows, key=lambda row: int(row["index"]))]


class _DatafileAudio(AudioDataset):
    """The audio side: one recording per datafile entry, labels as given."""

    def __init__(self, options: AvFramesOptions, shape: tuple[int, ...], train: bool,
                 items: list[tuple[Path, int | Tensor]], source: str):
        super().__init__(options, shape, train)
        self.items = items
        self._setup(source)


class AvFramesDataset(Dataset):
    """Yields ({audio_modality: [1, T, F], visual_modality: [C, H, W]}, multi-hot labels or -1)."""

    Options = AvFramesOptions
    paired = True

    def __init__(self, options: AvFramesOptions, input_shape: dict[str, tuple[int, ...]], train: bool):
        super().__init__(options, input_shape, train)
        a, v = options.audio_modality, options.visual_modality
        if a not in input_shape or v not in input_shape:
            raise ValueError(f"cav_mae_json yields modalities {[a, v]}; the model has {sorted(input_shape)} "
                             f"(set audio_modality / visual_modality to the model's modality names)")
        self.visual_shape = tuple(input_shape[v])
        if len(self.visual_shape) != 3:
            raise ValueError(f"cav_mae_json yields one frame (C, H, W); the {v!r} input shape is {self.visual_shape}")
        channels, height, width = self.visual_shape
        for field in ("visual_mean", "visual_std"):
            if len(getattr(options, field)) != channels:
                raise ValueError(f"{field} has {len(getattr(options, field))} values for {channels} channels")
        datafile = Path(options.datafile).expanduser()
        if not datafile.is_file():
            raise FileNotFoundError(f"cav_mae_json: datafile {str(datafile)!r} does not exist")
        entries = json.loads(datafile.read_text())["data"]
        if options.limit:
            entries = entries[: options.limit]
        self.classes = None
        index: dict[str, int] = {}
        if options.label_csv is not None:
            named = read_label_csv(Path(options.label_csv).expanduser())
            self.classes = [name for _, name in named]
            index = {mid: i for i, (mid, _) in enumerate(named)}
        self.clips = {Path(e["wav"]): (e["video_path"], e["video_id"]) for e in entries}
        items = [(Path(e["wav"]), self._labels(e, index)) for e in entries]
        self.audio = _DatafileAudio(options, tuple(input_shape[a]), train, items, f"cav_mae_json {datafile}")
        self.transform = v2.Compose([
            v2.Resize(min(height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop((height, width)), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(options.visual_mean, options.visual_std)])
        self.mean = torch.tensor(options.visual_mean).view(1, -1, 1, 1)
        self.std = torch.tensor(options.visual_std).view(1, -1, 1, 1)

    def _labels(self, entry: dict, index: dict[str, int]) -> int | Tensor:
        if not index:
            return -1
        labels = torch.zeros(len(index))
        unknown = [mid for mid in entry["labels"].split(",") if mid not in index]
        if unknown:
            raise ValueError(f"cav_mae_json: {entry['video_id']} has labels {unknown} missing from label_csv")
        labels[[index[mid] for mid in entry["labels"].split(",")]] = 1.0
        return labels

    def __len__(self) -> int:
        return len(self.audio)

    def describe(self, index: int) -> str:
        return self.audio.describe(index)

    def unreadable(self) -> list[str]:
        return self.audio.unreadable()

    def frame_path(self, index: int) -> Path:
        """The frame file of sample `index`: random (training) or middle (evaluation), else the next lower one."""
        folder, video_id = self.clips[self.audio.items[index][0]]
        k = int(torch.randint(self.options.frames, ())) if self.train else self.options.frames // 2
        path = Path(folder) / f"frame_{k}" / f"{video_id}.jpg"
        while not path.is_file() and k > 0:
            k -= 1
            path = Path(folder) / f"frame_{k}" / f"{video_id}.jpg"
        return path

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int | Tensor]:
        spectrogram, label = self.audio[index]
        path = self.frame_path(index)
        frame = self.transform(decode(path, str(path), self.visual_shape[0], self.options))
        return {self.options.audio_modality: spectrogram, self.options.visual_modality: frame}, label

    def denormalize(self, batch: Tensor) -> Tensor:
        """Either modality's normalised batch -> [0, 1] for pictures; the batch's shape tells the modality."""
        return denormalize_by_shape(batch, self.input_shape, {self.options.audio_modality: self.audio.denormalize,
                                                              self.options.visual_modality: self.denormalize_visual})

    def denormalize_visual(self, batch: Tensor) -> Tensor:
        """Normalised frames [B, C, H, W] -> [0, 1]."""
        return (batch * self.std.to(batch.device) + self.mean.to(batch.device)).clamp(0, 1)


@hookimpl
def register_datasets(register):
    register("cav_mae_json", AvFramesDataset)
