"""Loader throughput of one image set in three storage formats: a JPEG ImageFolder, packed uint8 `.npy`
shards, and WebDataset tar shards holding the same JPEG files byte for byte.

    python benchmarks/loader_formats.py --data DIR [--count 10000] [--side 256] [--workers 0 1 2]
        [--batch-size 64] [--batches 15] [--warmup 3] [--threads 1] [--out benchmarks/results/NAME.json]

DIR receives (once; reused when present) `jpeg/` (the first COUNT real Fashion-MNIST training images as
SIDE×SIDE RGB JPEGs, quality 90, one folder per class: `loader.py --make-image-folder`), `npy/`
(`maeframe pack jpeg npy --size SIDE`) and `tar/` (`shard-NNNNN.tar`, 1,000 samples each, every sample
the folder's own `.jpg` bytes plus its `.cls`, written with webdataset's `TarWriter`). Each format is then
timed by `loader.py`'s `time_case` through the engine's own loader for every `--workers` value, with the
paper's 224² augmentation (`recipes/image_mae_vitb.yaml` for the JPEG folder and the tar shards, decoded
and augmented in the loader; `recipes/image_mae_vitb_packed.yaml` for the packed shards, cropped per batch
on `runtime.device`). The JSON records every row with the machine, versions, commit and load average.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import loader  # benchmarks/loader.py: make_image_folder, time_case and the report
from loader import REPO

SHARD = 1000


def prepare_formats(data: Path, count: int, side: int, workers: int) -> dict[str, float]:
    """Write the three formats under `data` (each only when absent); returns seconds spent per format."""
    from maeframe_plugins.pack import pack

    seconds = {}
    if not (data / "jpeg").is_dir():
        started = time.perf_counter()
        loader.make_image_folder(data / "jpeg", count, side)
        seconds["jpeg"] = round(time.perf_counter() - started, 1)
    if not (data / "npy").is_dir():
        started = time.perf_counter()
        pack(str(data / "jpeg"), data / "npy", size=side, workers=workers)
        seconds["npy"] = round(time.perf_counter() - started, 1)
    if not (data / "tar").is_dir():
        import webdataset

        started = time.perf_counter()
        files = sorted((data / "jpeg").glob("*/*.jpg"), key=lambda p: p.name)  # as generated: index order
        classes = sorted(p.name for p in (data / "jpeg").iterdir())
        tmp = data / ".tar.tmp"
        tmp.mkdir()
        for first in range(0, len(files), SHARD):
            with webdataset.TarWriter(str(tmp / f"shard-{first // SHARD:05d}.tar")) as sink:
                for path in files[first: first + SHARD]:
                    sink.write({"__key__": path.stem, "jpg": path.read_bytes(),
                                "cls": classes.index(path.parent.name)})
        tmp.rename(data / "tar")
        seconds["tar"] = round(time.perf_counter() - started, 1)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder for the three formats (kept, reused)")
    ap.add_argument("--count", type=int, default=10000, help="images (default 10000)")
    ap.add_argument("--side", type=int, default=256, help="stored side in pixels (default 256)")
    ap.add_argument("--pack-workers", type=int, default=2, help="processes packing the .npy shards")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data.num_workers values")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=15, help="timed batches per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    prepared = prepare_formats(args.data, args.count, args.side, args.pack_workers)
    last = (args.count - 1) // SHARD
    recipes = REPO / "recipes"
    command = [
        "--case", "jpeg-imagefolder", str(recipes / "image_mae_vitb.yaml"),
        f"data.train.options.root={args.data / 'jpeg'}",
        "--case", "packed-npy", str(recipes / "image_mae_vitb_packed.yaml"),
        f"data.train.options.path={args.data / 'npy'}",
        "--case", "tar-shards-jpeg", str(recipes / "image_mae_vitb.yaml"),
        f"data.train={{name: tar_shards, options: {{urls: '{args.data / 'tar'}/shard-{{00000..{last:05d}}}.tar'}}}}",
        "--workers", *map(str, args.workers), "--batch-size", str(args.batch_size), "--batches", str(args.batches),
        "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    report = loader.main(command)
    report.update(benchmark="loader_formats", images=args.count, side=args.side, prepared_seconds=prepared,
                  formats={"jpeg-imagefolder": "root/<class>/<n>.jpg, quality 90",
                           "packed-npy": f"maeframe pack --size {args.side}: uint8 [n, 3, S, S] .npy shards",
                           "tar-shards-jpeg": f"webdataset tar shards of {SHARD} samples: the folder's .jpg bytes "
                                              f"+ .cls"},
                  disk_mb={name: round(sum(f.stat().st_size for f in (args.data / name).rglob("*") if f.is_file())
                                       / 1e6, 1) for name in ("jpeg", "npy", "tar")})
    if args.out:
        import json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
