"""cav_mae_json: CAV-MAE's datafile (a recording and pre-extracted frames per clip) read on written files."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from maeframe_plugins.av_frames import AvFramesDataset, AvFramesOptions

SHAPES = {"audio": (1, 64, 32), "visual": (3, 32, 32)}


def write_clips(root):
    """Two clips: 1 s of noise each, frames 0..9 of solid grey levels k·20 (clip b lacks frames 5..9)."""
    entries = []
    for clip, labels, frames in (("a", "/m/1", range(10)), ("b", "/m/1,/m/2", range(5))):
        sf.write(root / f"{clip}.wav", np.random.default_rng(0).standard_normal(16000) * 0.1, 16000)
        for k in frames:
            (root / f"frame_{k}").mkdir(exist_ok=True)
            Image.new("RGB", (48, 40), (k * 20,) * 3).save(root / f"frame_{k}" / f"{clip}.jpg", quality=100)
        entries.append({"video_id": clip, "wav": str(root / f"{clip}.wav"), "video_path": str(root),
                        "labels": labels})
    (root / "data.json").write_text(json.dumps({"data": entries}))
    (root / "labels.csv").write_text("index,mid,display_name\n0,/m/1,One\n1,/m/2,Two\n")
    return AvFramesOptions(datafile=str(root / "data.json"), label_csv=str(root / "labels.csv"),
                           visual_mean=(0, 0, 0), visual_std=(1, 1, 1))


def test_reads_recordings_frames_and_labels(tmp_path):
    options = write_clips(tmp_path)
    test = AvFramesDataset(options, SHAPES, train=False)
    assert test.classes == ["One", "Two"] and len(test) == 2
    (a, label_a), (b, label_b) = test[0], test[1]
    assert a["audio"].shape == (1, 64, 32) and a["visual"].shape == (3, 32, 32)
    assert label_a.tolist() == [1, 0] and label_b.tolist() == [1, 1]
    assert a["visual"].mean().item() * 255 == pytest.approx(100, abs=2)   # the middle frame, frame_5
    assert b["visual"].mean().item() * 255 == pytest.approx(80, abs=2)    # frame_5 is missing: frame_4
    train = AvFramesDataset(options, SHAPES, train=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        seen.add(round(train[0][0]["visual"].mean().item() * 255 / 20))
    assert len(seen) > 3  # training draws a frame per sample

