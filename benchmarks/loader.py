"""Loader throughput of a recipe's training data: images per second delivered to the model, ready to use.

Each case is a recipe (plus overrides). The script builds the recipe's training dataset and the engine's
own loader (`make_loader`: `SeededDataset` under `ResumableBatchSampler`, the recipe's data settings with
`data.num_workers` replaced by each `--workers` value), then times what `Pretrainer._next` does per batch:
fetch from the loader, copy to `runtime.device`, and apply the dataset's `device_transform` if it has one
(the packed dataset's RandomResizedCrop + flip + normalise), with a device sync at the end. No model runs.

    python benchmarks/loader.py --case NAME RECIPE [key=value ...] [--case ...] [--workers 0 1 2]
        [--batch-size B] [--batches N] [--warmup W] [--threads T] [--out benchmarks/results/NAME.json]
    python benchmarks/loader.py --make-image-folder DIR [--count 5000] [--side 256]   # test data

`--make-image-folder` writes real Fashion-MNIST training images (the first COUNT) as SIDE×SIDE RGB JPEGs
(bicubic upscale, quality 90) in one folder per class: a JPEG ImageFolder like ImageNet's, from data
that exists offline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(path))

import maeframe  # noqa: E402
from maeframe.build import build_dataset, prepare  # noqa: E402
from maeframe.engine.data import ResumableBatchSampler, make_loader, sample_seed  # noqa: E402
from maeframe.engine.runtime import select_runtime  # noqa: E402
from maeframe.engine.window import device_name  # noqa: E402
from pretrain_step import _git_commit, cpu_model  # noqa: E402


def make_image_folder(root: Path, count: int, side: int) -> None:
    """The first `count` Fashion-MNIST training images as side×side RGB JPEGs under root/<class>/."""
    from PIL import Image
    from maeframe_plugins.image_data import FASHION_MNIST_ROOT, FashionMNISTDataset, load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "train")
    for i in range(count):
        folder = root / FashionMNISTDataset.classes[labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(images[i]).convert("RGB").resize((side, side), Image.BICUBIC)
        picture.save(folder / f"{i:05d}.jpg", quality=90)
    print(f"wrote {count} {side}×{side} RGB JPEGs of Fashion-MNIST to {root}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(recipe: str, overrides: list[str], workers: int, batch_size: int | None, batches: int,
              warmup: int) -> dict:
    """Images per second over `batches` batches after `warmup`, as `Pretrainer._next` delivers them."""
    extra = [f"data.num_workers={workers}"] + ([f"data.batch_size={batch_size}"] if batch_size else [])
    prepared = prepare(recipe, [*overrides, *extra])
    data = prepared.recipe.data
    device = select_runtime(prepared.recipe.runtime).device
    dataset = build_dataset(prepared, "train")
    sampler = ResumableBatchSampler(len(dataset), data.batch_size, prepared.recipe.seed)
    if sampler.batches_per_epoch < warmup + batches:
        raise SystemExit(f"{recipe}: {len(dataset)} images give {sampler.batches_per_epoch} batches of "
                         f"{data.batch_size}; need {warmup + batches}")
    loader = make_loader(dataset, data, sampler, pin_memory=device.type == "cuda")
    transform = dataset.device_transform
    stream = iter(loader)
    fetch_s = transform_s = 0.0
    started = None
    for b in range(warmup + batches):
        if b == warmup:
            sync(device)
            started, fetch_s, transform_s = time.perf_counter(), 0.0, 0.0
        t0 = time.perf_counter()
        batch = next(stream)[0].to(device, non_blocking=True)
        t1 = time.perf_counter()
        if transform is not None:
            batch = transform(batch, torch.Generator(device).manual_seed(sample_seed(prepared.recipe.seed, b, 0)))
        sync(device)
        fetch_s, transform_s = fetch_s + t1 - t0, transform_s + time.perf_counter() - t1
    wall = time.perf_counter() - started
    del stream, loader
    return {
        "workers": workers, "batch_size": data.batch_size, "batches": batches, "warmup": warmup,
        "img_s": round(data.batch_size * batches / wall, 1), "wall_s": round(wall, 3),
        "fetch_ms_per_batch": round(1e3 * fetch_s / batches, 2),
        "device_transform_ms_per_batch": round(1e3 * transform_s / batches, 2) if transform else None,
        "dataset": f"{data.train.name}", "dataset_size": len(dataset), "device": device_name(device),
        "output_shape": list(batch.shape), "output_dtype": str(batch.dtype).replace("torch.", ""),
    }


def print_table(rows: list[dict]) -> None:
    cols = ["case", "dataset", "workers", "batch", "img/s", "fetch ms/batch", "device aug ms/batch", "output"]
    cells = [[r["case"], r["dataset"], str(r["workers"]), str(r["batch_size"]), f"{r['img_s']:.0f}",
              f"{r['fetch_ms_per_batch']:.1f}",
              "-" if r["device_transform_ms_per_batch"] is None else f"{r['device_transform_ms_per_batch']:.1f}",
              f"{r['output_dtype']} {'×'.join(map(str, r['output_shape']))}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(line(cols))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="+", action="append", default=[], metavar="NAME RECIPE [KEY=VALUE]",
                    help="a label, a recipe and its overrides (repeatable)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values to time")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's data.batch_size")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up, caches)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of the main process (default: torch's); loader workers use 1")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    ap.add_argument("--make-image-folder", type=Path, default=None, metavar="DIR",
                    help="write a JPEG ImageFolder of real Fashion-MNIST images to DIR and exit")
    ap.add_argument("--count", type=int, default=5000, help="--make-image-folder: images (default 5000)")
    ap.add_argument("--side", type=int, default=256, help="--make-image-folder: side in pixels (default 256)")
    args = ap.parse_args(argv)
    if args.make_image_folder:
        make_image_folder(args.make_image_folder, args.count, args.side)
        return None
    if not args.case or any(len(case) < 2 for case in args.case):
        ap.error("give at least one --case NAME RECIPE [KEY=VALUE ...]")

    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for name, recipe, *overrides in args.case:
        for workers in args.workers:
            row = {"case": name, "recipe": recipe, "overrides": overrides,
                   **time_case(recipe, overrides, workers, args.batch_size, args.batches, args.warmup)}
            print(f"  {name} workers={workers}: {row['img_s']:.0f} img/s", flush=True)
            rows.append(row)
    report = {
        "benchmark": "loader",
        "cpu_model": cpu_model(), "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "maeframe": maeframe.__version__},
        "git_commit": _git_commit(),
        "method": ("per batch, as Pretrainer._next: next(loader) -> .to(runtime.device) -> dataset.device_transform "
                   "(if any) -> device sync; img/s = batch × timed batches / wall seconds after warm-up batches"),
        "loadavg_start": loadavg_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "results": rows,
    }
    print()
    print_table(rows)
    print(f"{torch.get_num_threads()} torch threads in the main process; load average at start {loadavg_start}, "
          f"at end {report['loadavg_end']} ({os.cpu_count()} CPUs)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
