"""The built-in subcommands that belong to modality plugins: `maeframe pack` (images into packed or tar
shards), `maeframe image-stats` (per-channel statistics) and `maeframe audio-stats` (fbank statistics). Registered through the `maeframe_commands` entry-point group;
this module stays light (heavy imports happen inside the commands) so `maeframe --help` stays fast."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maeframe import hookimpl


def pack_command(args: argparse.Namespace) -> int:
    """Decode a dataset's images once into uint8 memory-mappable shards (the `packed` dataset plugin)."""
    import yaml

    from .pack import pack

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --option {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        options[key] = yaml.safe_load(value)
    index = pack(args.source, args.output, args.size, args.format, args.channels, options, args.shard_size,
                 args.workers, args.max_bad_fraction, progress=sys.stderr.isatty(), to=args.to,
                 encoding=args.image_format, quality=args.quality)
    train = (f"{{name: packed, options: {{path: {args.output}}}}}" if args.to == "npy" else
             f"{{name: tar_shards, options: {{urls: '{Path(args.output) / index['urls']}'}}}}")
    print(f"wrote {args.output}: {index['count']} images of {'×'.join(map(str, index['shape']))} uint8 in "
          f"{len(index['shards'])} {args.to} shards, {index['skipped_count']} unreadable skipped, "
          f"{index['seconds']} s; train with data.train: {train}")
    return 0


def image_stats_command(args: argparse.Namespace) -> int:
    """Per-channel mean/std of a recipe's training images (image datasets only)."""
    from .image_stats import image_stats

    stats = image_stats(args.recipe, args.overrides, limit=args.limit, workers=args.workers, write=args.write)
    print(f"{args.recipe}: {stats['channels']} channels over {stats['num_images']} images "
          f"({stats['num_pixels']} pixels; {stats['skipped']} unreadable skipped)")
    mean = ", ".join(f"{v:.6f}" for v in stats["mean"])
    std = ", ".join(f"{v:.6f}" for v in stats["std"])
    print(f"mean [{mean}]  std [{std}]")
    if stats["path"]:
        print(f"wrote {stats['path']} (read through data.train.options.stats_file)")
    else:
        print(f"use: 'data.train.options.mean=[{mean}]' 'data.train.options.std=[{std}]'")
    return 0


def audio_stats_command(args: argparse.Namespace) -> int:
    """Mean/std of the log-mel fbank over a recipe's training recordings (audio datasets only)."""
    from .audio_stats import audio_stats

    try:
        stats = audio_stats(args.recipe, args.overrides, limit=args.limit, write=args.write)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.recipe}: fbank of {stats['num_files']} recordings ({stats['num_frames']} frames x "
          f"{stats['num_mel_bins']} mel bins; {stats['skipped']} skipped)")
    print(f"mean {stats['mean']:.6f}  std {stats['std']:.6f}")
    if stats["path"]:
        print(f"wrote {stats['path']} (read through data.train.options.stats_file)")
    else:
        print(f"use: data.train.options.mean={stats['mean']:.6f} data.train.options.std={stats['std']:.6f}")
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    sub = subparsers
    pack = sub.add_parser("pack", help="decode images once into uint8 shards for the `packed` dataset",
                          description="Read every image of SOURCE through an image dataset plugin (decoding in "
                                      "--workers processes), resize its short side to --size, centre-crop to a "
                                      "square and write OUTPUT/shard-NNNNN.npy (uint8 [n, C, S, S], memory-"
                                      "mappable) or, with --to webdataset, OUTPUT/shard-NNNNN.tar (WebDataset), "
                                      "plus OUTPUT/index.json and OUTPUT/sources.txt. OUTPUT appears only "
                                      "when complete. Unreadable images are skipped, logged and counted.")
    pack.add_argument("source", help="what the --format plugin reads: an ImageFolder tree, a folder of images "
                                     "(image_files), a .txt/.csv list (image_list), tar shard URLs (tar_shards), "
                                     "the Fashion-MNIST folder")
    pack.add_argument("output", help="new folder to write (must not exist)")
    pack.add_argument("--size", type=int, required=True,
                      help="stored side S; use the model's input size / 0.875 (256 for 224) so crops have room")
    pack.add_argument("--format", default="image_folder",
                      help="dataset plugin that reads SOURCE: image_folder (default), image_files, image_list, "
                           "tar_shards, fashion_mnist, ...")
    pack.add_argument("--channels", type=int, default=3, help="stored channels, any count (default 3)")
    pack.add_argument("--to", choices=["npy", "webdataset"], default="npy",
                      help="output: npy (uint8 .npy shards for the `packed` dataset, default) or webdataset (tar "
                           "shards of KEY.jpg + KEY.cls for `tar_shards`; needs the webdataset extra)")
    pack.add_argument("--image-format", choices=["jpg", "png", "npy"], default=None,
                      help="--to webdataset: how each image is stored (default jpg for 1 or 3 channels, else npy)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality for --image-format jpg (default 95)")
    pack.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="option of the source dataset plugin, e.g. split=test or limit=1000 (repeatable)")
    pack.add_argument("--shard-size", type=int, default=4096,
                      help="images per shard file (default 4096: ~800 MB at 3×256², 313 files for ImageNet; "
                           "each loader process keeps one open file per shard it has read)")
    pack.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in this process)")
    pack.add_argument("--max-bad-fraction", type=float, default=0.01,
                      help="fail when more than this fraction of the images is unreadable (default 0.01)")
    pack.set_defaults(func=pack_command)

    image_stats = sub.add_parser("image-stats", help="per-channel mean/std of a recipe's training images",
                                 description="Compute the per-channel mean and std of the images of the recipe's "
                                             "data.train (an image dataset), as the dataset scales them (8-bit / "
                                             "255, 16-bit / 65535, floats as stored) at their stored size, and "
                                             "print the overrides to use; --write stores them at "
                                             "data.train.options.stats_file.")
    image_stats.add_argument("recipe", help="path to a YAML recipe with an image dataset")
    image_stats.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    image_stats.add_argument("--limit", type=int, help="use N images spread over the dataset (default: all)")
    image_stats.add_argument("--workers", type=int, default=0, help="decoding processes (default 0)")
    image_stats.add_argument("--write", action="store_true",
                             help="write the statistics as JSON to data.train.options.stats_file")
    image_stats.set_defaults(func=image_stats_command)

    audio_stats = sub.add_parser("audio-stats", help="fbank mean/std of a recipe's training recordings",
                                 description="Compute the mean and std of the log-mel fbank over the recordings "
                                             "of the recipe's data.train (an audio dataset) and print the "
                                             "overrides to use; --write stores them at data.train.options.stats_file.")
    audio_stats.add_argument("recipe", help="path to a YAML recipe with an audio dataset")
    audio_stats.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    audio_stats.add_argument("--limit", type=int, help="use N recordings spread over the dataset (default: all)")
    audio_stats.add_argument("--write", action="store_true",
                             help="write the statistics as JSON to data.train.options.stats_file")
    audio_stats.set_defaults(func=audio_stats_command)
