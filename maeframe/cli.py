"""The `maeframe` command: one small function per subcommand."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MaeframeError


def cmd_run(args: argparse.Namespace) -> int:
    """Validate fully before anything is written, then train."""
    from .build import prepare
    from .engine.run import run_task

    prepared = prepare(args.recipe, args.overrides)
    resume = args.resume
    if args.auto_resume:
        from .engine.rundir import latest_checkpoint

        resume = latest_checkpoint(Path(prepared.recipe.runtime.output_dir) / prepared.recipe.name) is not None
    run_task(prepared, resume=resume)  # prints its summary (pretraining) or results (downstream)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check every recipe (one that fails does not stop the others); exit 2 when any failed."""
    from .build import prepare, require_data

    failed = 0
    for path in args.recipes:
        try:
            prepared = prepare(path, args.overrides)
            if args.data:
                require_data(prepared)
        except MaeframeError as err:
            named = str(err) if str(path) in str(err) else f"{path}: {err}"
            print(f"error: {named}", file=sys.stderr)
            failed += 1
            continue
        spec = prepared.components.tokenizer.spec
        checked = "; data, device and output directory checked" if args.data else ""
        print(f"{path}: ok ({prepared.recipe.name}: grid {spec.grid}, {spec.num_tokens} tokens of "
              f"{spec.patch_dim}{checked})")
    return 2 if failed else 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import make_plugin_manager, plugin_distribution
    from .registry import Registry, plural

    pm = make_plugin_manager(args.module)
    registry = Registry(pm)
    for kind, table in registry.entries.items():
        print(f"{plural(kind)}:")
        for name, entry in sorted(table.items()):
            origin = plugin_distribution(pm, entry.plugin)
            print(f"  {name}  (plugin {entry.plugin}{', ' + origin if origin else ''}; "
                  f"{entry.cls.__module__}.{entry.cls.__qualname__})")
            for field, info in entry.cls.Options.model_fields.items():
                default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
                print(f"      {field}: {info.description or ''} [{default}]")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .interop.timm_export import export_encoder

    export = export_encoder(args.checkpoint, args.output, args.timm_name)
    guess = "" if export.heads_known else (" (num_heads is inferred: reference weights do not store it; use the "
                                           "value the encoder was trained with)")
    print(f"wrote {export.path}; build the encoder in timm with{guess}:")
    print(export.create_model_call())
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    """A sharded fsdp checkpoint (DCP directory) -> one file, e.g. to copy it or load it elsewhere."""
    from .engine.checkpoint import atomic_save, load_checkpoint

    source = Path(args.source)
    if not source.is_dir():
        print(f"error: {source} is not a DCP checkpoint directory (e.g. runs/NAME/last.dcp)", file=sys.stderr)
        return 2
    state = load_checkpoint(source)
    atomic_save(state, args.output)
    print(f"wrote {args.output}: step {state['step']}, {len(state['model'])} model tensors; it resumes, exports "
          f"and initialises downstream runs as a last.pt does")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train each recipe under the same seed, data and budget, evaluate each the same way, write a report."""
    import shlex

    from .engine.compare import compare

    command = shlex.join(["maeframe", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else None
    compare(args.recipes, args.name, args.overrides, eval_limit=args.eval_limit,
            knn_train_limit=args.knn_train_limit, eval_ratio=args.eval_ratio, eval_seed=args.eval_seed,
            resume=args.resume, command=command)
    return 0


def cmd_audio_stats(args: argparse.Namespace) -> int:
    """Mean/std of the log-mel fbank over a recipe's training recordings (audio datasets only)."""
    try:
        from maeframe_plugins.audio_data import audio_stats
    except ImportError as err:
        print(f"error: audio-stats needs the built-in audio plugins (maeframe_plugins.audio_data): {err}",
              file=sys.stderr)
        return 2
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


def cmd_pack(args: argparse.Namespace) -> int:
    """Decode a dataset's images once into uint8 memory-mappable shards (the `packed` dataset plugin)."""
    import yaml

    try:
        from maeframe_plugins.pack import pack
    except ImportError as err:
        print(f"error: pack needs the built-in image plugins (maeframe_plugins.pack): {err}", file=sys.stderr)
        return 2
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


def cmd_image_stats(args: argparse.Namespace) -> int:
    """Per-channel mean/std of a recipe's training images (image datasets only)."""
    try:
        from maeframe_plugins.image_stats import image_stats
    except ImportError as err:
        print(f"error: image-stats needs the built-in image plugins (maeframe_plugins.image_stats): {err}",
              file=sys.stderr)
        return 2
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


def cmd_export_classifier(args: argparse.Namespace) -> int:
    from .interop.export_classifier import export_classifier

    formats = tuple(f for f in ("torchscript", "onnx") if f not in args.skip)
    facts = export_classifier(args.checkpoint, args.out_dir, formats, ema=args.ema, atol=args.atol)
    diffs = ", ".join(f"{k} max |diff| {v:.2e}" for k, v in facts["max_abs_diff"].items())
    print(f"wrote {', '.join(facts['files'])} and classifier.json to {args.out_dir}: inputs "
          f"[B, {', '.join(map(str, facts['input_shape']))}] -> logits [B, {len(facts['classes'])}]; checked: {diffs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maeframe", description="Masked-autoencoder pretraining from recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe; fields can be overridden.")
    run.add_argument("recipe", help="path to a YAML recipe")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.epochs=5")
    run.add_argument("--resume", action="store_true", help="continue <output_dir>/<name>/last.pt exactly")
    run.add_argument("--auto-resume", action="store_true",
                     help="resume when last.pt exists, else start (for jobs a scheduler requeues)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check recipes without running them",
                              description="Check recipes (encoding, YAML, schema, plugins, component options "
                                          "on the token grid); with --data also the data, the device and the "
                                          "output directory. Reads no sample and writes nothing; every recipe "
                                          "is checked even when one fails (exit status 2).")
    validate.add_argument("recipes", nargs="+", help="YAML recipes")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override applied to every recipe (repeatable)")
    validate.add_argument("--data", action="store_true",
                          help="also build the datasets (roots and files exist, data.train holds one optimizer "
                               "step of data.batch_size × optim.accum_steps samples), check that runtime.device "
                               "exists and that <output_dir>/<name> can be created and written")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list components by kind with plugin and options",
                             description="List every registered component, its plugin and its options.")
    plugins.add_argument("--module", action="append", default=[], help="also load this plugin module")
    plugins.set_defaults(func=cmd_plugins)

    export = sub.add_parser("export", help="write the encoder as timm-loadable safetensors",
                            description="Export a checkpoint's encoder to safetensors in timm's ViT layout.")
    export.add_argument("checkpoint", help="maeframe checkpoint (e.g. runs/NAME/last.pt, or last.dcp of an fsdp "
                                           "run) or official MAE .pth")
    export.add_argument("output", help="output .safetensors path")
    export.add_argument("--timm-name", help="timm architecture (default: inferred, e.g. vit_base_patch16_224)")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser("convert-checkpoint", help="gather a sharded fsdp checkpoint into one .pt file",
                             description="Read a DCP checkpoint directory written by runtime.strategy=fsdp "
                                         "(runs/NAME/last.dcp) in one process and write it as one checkpoint "
                                         "file with full tensors, the format ddp runs write (last.pt).")
    convert.add_argument("source", help="DCP checkpoint directory, e.g. runs/NAME/last.dcp")
    convert.add_argument("output", help="output file, e.g. runs/NAME/last.pt")
    convert.set_defaults(func=cmd_convert_checkpoint)

    export_cls = sub.add_parser("export-classifier", help="write a fine-tuned classifier as TorchScript and ONNX",
                                description="Export a finetune/linprobe checkpoint as OUT_DIR/classifier.pt "
                                            "(TorchScript) and classifier.onnx, inputs [B, *input_shape] "
                                            "normalised as the eval data -> logits; both are checked against "
                                            "PyTorch on the same batch. Classes and normalisation go to "
                                            "classifier.json.")
    export_cls.add_argument("checkpoint", help="runs/NAME/best.pt or last.pt of a finetune or linprobe run")
    export_cls.add_argument("out_dir", help="output folder")
    export_cls.add_argument("--ema", action="store_true", help="export the EMA weights (runs with `ema`)")
    export_cls.add_argument("--skip", action="append", default=[], choices=["torchscript", "onnx"],
                            help="leave out one format (repeatable)")
    export_cls.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed (1e-4)")
    export_cls.set_defaults(func=cmd_export_classifier)

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
    pack.set_defaults(func=cmd_pack)

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
    image_stats.set_defaults(func=cmd_image_stats)

    audio_stats = sub.add_parser("audio-stats", help="fbank mean/std of a recipe's training recordings",
                                 description="Compute the mean and std of the log-mel fbank over the recordings "
                                             "of the recipe's data.train (an audio dataset) and print the "
                                             "overrides to use; --write stores them at data.train.options.stats_file.")
    audio_stats.add_argument("recipe", help="path to a YAML recipe with an audio dataset")
    audio_stats.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    audio_stats.add_argument("--limit", type=int, help="use N recordings spread over the dataset (default: all)")
    audio_stats.add_argument("--write", action="store_true",
                             help="write the statistics as JSON to data.train.options.stats_file")
    audio_stats.set_defaults(func=cmd_audio_stats)

    compare = sub.add_parser("compare", help="train recipe variants and compare them in a report",
                             description="Train each recipe (same seed, data and budget required) into "
                                         "<output_dir>/<NAME>/<recipe name>/, evaluate all under one fixed mask "
                                         "(masked PSNR, high-frequency error, kNN) and write "
                                         "<output_dir>/<NAME>/report.md, report.json and plots.")
    compare.add_argument("recipes", nargs="+", help="two or more YAML recipes with distinct names")
    compare.add_argument("--name", help="comparison directory name (default: the recipe names joined by -vs-)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override applied to every recipe (repeatable)")
    compare.add_argument("--eval-limit", type=int, default=10000, help="eval images used (default 10000)")
    compare.add_argument("--knn-train-limit", type=int, default=10000,
                         help="train images (no augmentation) in the kNN bank (default 10000)")
    compare.add_argument("--eval-ratio", type=float, default=0.75, help="ratio of the fixed eval mask (0.75)")
    compare.add_argument("--eval-seed", type=int, help="seed of the fixed eval mask (default: the recipes' seed)")
    compare.add_argument("--resume", action="store_true",
                         help="continue (or reuse, when finished) variant runs already in the comparison directory")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MaeframeError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
