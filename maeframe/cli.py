"""The `maeframe` command: one small function per subcommand."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MaeframeError


def cmd_run(args: argparse.Namespace) -> int:
    """Validate fully before anything is written, then train."""
    from .build import prepare
    from .engine.run import run_task

    prepared = prepare(args.recipe, args.overrides)
    resume = "auto" if args.auto_resume else args.resume
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
        checked = "; data, device and output directory checked" if args.data else ""
        flows = prepared.modalities or ({"": prepared.components} if prepared.components else {})
        grids = ", ".join(f"{f'{name} ' if name else ''}grid {c.tokenizer.spec.grid}, {c.tokenizer.spec.num_tokens} "
                          f"tokens of {c.tokenizer.spec.patch_dim}" for name, c in flows.items())
        grids = grids or "tokenizers from init.checkpoint"  # a retrieval recipe
        print(f"{path}: ok ({prepared.recipe.name}: {grids}{checked})")
    return 2 if failed else 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Components (filtered by --kind and --plugin) with their options, then the plugins themselves."""
    from .fields import line
    from .plugins import make_plugin_manager, plugin_distribution, plugin_hooks
    from .registry import KINDS, Registry, plural

    kinds = {**{kind: kind for kind in KINDS}, **{plural(kind): kind for kind in KINDS}}
    if args.kind and args.kind not in kinds:
        print(f"error: --kind {args.kind!r} is not a kind; kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    pm = make_plugin_manager(args.module)
    registry = Registry(pm)
    infos = sorted(pm.infos.values(), key=lambda info: info.name)
    if args.plugin:
        infos = [info for info in infos if info.named_by(args.plugin)]
        if not infos:
            print(f"error: --plugin {args.plugin!r} names no plugin (a plugin, module or distribution name); "
                  f"plugins found: {', '.join(sorted(pm.infos))}", file=sys.stderr)
            return 2
    chosen = {info.name for info in infos}
    for kind, table in registry.entries.items():
        if args.kind and kinds[args.kind] != kind:
            continue
        entries = [entry for _, entry in sorted(table.items()) if entry.plugin in chosen]
        if not entries and args.plugin:
            continue  # no empty headings for a plugin's listing
        print(f"{plural(kind)}:")
        for entry in entries:
            origin = plugin_distribution(pm, entry.plugin)
            print(f"  {entry.name}  (plugin {entry.plugin}{', ' + origin if origin else ''}; "
                  f"{entry.cls.__module__}.{entry.cls.__qualname__})")
            for field, info in entry.cls.Options.model_fields.items():
                print(f"      {line(field, info)}")
    if args.kind:
        return 0
    print("plugins:")
    notes = {"blocked": "blocked by MAEFRAME_BLOCK_PLUGINS", "not allowed": "not named in MAEFRAME_LOAD_PLUGINS"}
    for info in infos:
        plugin = pm.get_plugin(info.name)
        hooks = ", ".join(plugin_hooks(pm, plugin)) if plugin is not None else ""
        state = f"hooks: {hooks or 'none'}" if info.status == "loaded" else f"not loaded: {notes[info.status]}"
        where = f"entry point {info.module}" if info.source == "entry point" else f"module {info.module}, imported by name"
        print(f"  {info.name}  {info.origin}  ({where})  {state}")
    return 0


def cmd_recipe_fields(args: argparse.Namespace) -> int:
    """Every field of every recipe kind: type and constraints, default, description."""
    from .fields import line, walk
    from .recipe import (UNUSED_REASON, UNUSED_RUNTIME_FIELDS, FinetuneRecipe, KnnRecipe, LinprobeRecipe, Recipe,
                         RetrievalRecipe)

    components = {"tokenizer": "tokenizer", "masker": "masker", "target": "target", "losses.<i>": "loss",
                  "data.train": "dataset", "data.eval": "dataset", "runtime.loggers.<i>": "logger"}
    tasks = {"pretrain": Recipe, "finetune": FinetuneRecipe, "linprobe": LinprobeRecipe, "knn": KnnRecipe,
             "retrieval": RetrievalRecipe}
    for task, model in tasks.items():
        if args.task and task != args.task:
            continue
        print(f"task: {task}{'  (the default when a recipe has no task:)' if task == 'pretrain' else ''}")
        for path, info in walk(model):
            if args.match and args.match not in path:
                continue
            text = line(path, info)
            parent, _, leaf = path.rpartition(".")
            if leaf == "options" and parent in components:
                text += f"  (`maeframe plugins --kind {components[parent]}` lists each one's options)"
            if parent == "runtime" and leaf in UNUSED_RUNTIME_FIELDS[task]:
                text += f"  (refused by a {task} run, which {UNUSED_REASON[task]})"
            print(f"  {text}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """Write a ready plugin distribution (masker, target, loss, tests, pyproject, README)."""
    from .newplugin import write_plugin

    try:
        root, names = write_plugin(args.name, args.dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {root}: distribution {names['distribution']}, module {names['module']}, plugin {names['name']} "
          f"(masker {names['name']}_masker, target {names['name']}_target, loss {names['name']}_loss)")
    print(f"next: cd {root} && pip install -e . && pytest")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from .interop.hf_export import export_hf

        if args.timm_name:
            raise MaeframeError("--timm-name is for --format timm")
        export = export_hf(args.checkpoint, args.output, encoder_only=args.encoder_only)
        print(f"wrote {export.path} (config.json, model.safetensors); load it in transformers with:")
        print(f"import transformers; model = {export.load_call()}")
        return 0
    from .interop.timm_export import export_encoder

    if args.encoder_only:
        raise MaeframeError("--encoder-only is for --format hf (timm exports are encoder-only)")
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


def cmd_export_classifier(args: argparse.Namespace) -> int:
    from .interop.export_classifier import FORMATS, export_classifier

    formats = tuple(f for f in FORMATS if f not in args.skip)
    facts = export_classifier(args.checkpoint, args.out_dir, formats, ema=args.ema, atol=args.atol)
    diffs = ", ".join(f"{k} max |diff| {v:.2e}" for k, v in facts["max_abs_diff"].items())
    print(f"wrote {', '.join(facts['files'])} and classifier.json to {args.out_dir}: inputs "
          f"[B, {', '.join(map(str, facts['input_shape']))}] -> logits [B, {len(facts['classes'])}]; checked: {diffs}")
    return 0


def _key_values(items: list[str], flag: str) -> dict:
    """KEY=VALUE strings -> {key: YAML-parsed value}; a malformed one is an error naming the flag."""
    from .errors import MaeframeError
    from .recipe_file import parse_value

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MaeframeError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key] = parse_value(value)
    return pairs


def _best_device(choice: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct a user's files with pretrained weights; pictures and reconstruct.json in --out."""
    from .engine.reconstruct import reconstruct

    results = reconstruct(args.weights, args.inputs, args.out, format=args.format, mask_ratio=args.mask_ratio,
                          masker=args.masker, masker_options=_key_values(args.masker_option, "--masker-option"),
                          seed=args.seed, mask_file=args.mask_file, overrides=args.overrides,
                          device=_best_device(args.device))
    for result in results:
        loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
        print(f"{result.path}: loss {loss}, mask ratio {result.mask_ratio:.2f}, wrote {len(result.files)} files")
    print(f"wrote {Path(args.out) / 'reconstruct.json'}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Encoder features of a dataset, folder or file list -> one safetensors file (resumable by chunk)."""
    from .engine.embed import embed
    from .engine.embed_store import load_embeddings

    out = embed(args.weights, args.data, args.out, format=args.format, split=args.split, pool=args.pool,
                device=args.device, batch_size=args.batch_size, chunk_size=args.chunk_size,
                num_workers=args.num_workers, overrides=args.overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        features, labels, _ = load_embeddings(out)
        print(f"wrote {out}: features {list(features.shape)}" + ("" if labels is None else f", labels {list(labels.shape)}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maeframe", description="Masked-autoencoder pretraining from recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe; fields can be overridden.")
    run.add_argument("recipe", help="path to a YAML recipe")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.epochs=5")
    run.add_argument("--resume", action="store_true", help="continue <output_dir>/<name>/last.pt exactly")
    run.add_argument("--auto-resume", action="store_true",
                     help="resume when last.pt exists, else start; an earlier attempt that died before its first "
                          "checkpoint is moved aside into failed-attempt-N/ (for jobs a scheduler requeues)")
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

    plugins = sub.add_parser("plugins", help="list components by kind with plugin and options, and the plugins",
                             description="List every registered component (its plugin, distribution, class and "
                                         "options with type, constraints, choices, default and description), then "
                                         "every plugin found (distribution and version, module, the hooks it "
                                         "implements, or why it was not loaded).")
    plugins.add_argument("--module", action="append", default=[], help="also load this plugin module")
    plugins.add_argument("--kind", help="only this kind: tokenizer, masker, target, loss, dataset, weight_format or "
                                        "logger")
    plugins.add_argument("--plugin", help="only this plugin's components (a plugin, module or distribution name)")
    plugins.set_defaults(func=cmd_plugins)

    fields = sub.add_parser("recipe-fields", help="list every recipe field with type, default and description",
                            description="Print every field a recipe of each task (pretrain, finetune, linprobe, "
                                        "knn, retrieval) can set, as a dotted path with its description, type, constraints "
                                        "and default. Component options are listed by `maeframe plugins`.")
    fields.add_argument("match", nargs="?", help="only fields whose path contains this text, e.g. max_steps")
    fields.add_argument("--task", choices=["pretrain", "finetune", "linprobe", "knn", "retrieval"],
                        help="only this task")
    fields.set_defaults(func=cmd_recipe_fields)

    new_plugin = sub.add_parser("new-plugin", help="start a plugin distribution from the template",
                                description="Write DIR/maeframe-NAME/: a distribution with a masker, a target and a "
                                            "loss registered under NAME_masker, NAME_target, NAME_loss, tests "
                                            "that use maeframe.testing, a pyproject.toml with the `maeframe` "
                                            "entry point and a README. Its tests pass as generated.")
    new_plugin.add_argument("name", help="plugin name: lower-case letters, digits and _ (e.g. mylab)")
    new_plugin.add_argument("--dir", default=".", help="folder to create the distribution in (default: .)")
    new_plugin.set_defaults(func=cmd_new_plugin)

    export = sub.add_parser("export", help="write the encoder for timm, or the model for Hugging Face transformers",
                            description="Export a checkpoint's encoder to safetensors in timm's ViT layout "
                                        "(--format timm), or a directory Hugging Face transformers loads "
                                        "(--format hf): ViTMAEForPreTraining (encoder and decoder) or, with "
                                        "--encoder-only, ViTModel.")
    export.add_argument("checkpoint", help="maeframe checkpoint (e.g. runs/NAME/last.pt, or last.dcp of an fsdp "
                                           "run); --format timm also reads an official MAE .pth")
    export.add_argument("output", help="output .safetensors path (timm) or directory (hf)")
    export.add_argument("--format", choices=["timm", "hf"], default="timm",
                        help="timm: safetensors for timm.create_model (default); hf: a transformers directory "
                             "(config.json + model.safetensors)")
    export.add_argument("--encoder-only", action="store_true",
                        help="hf: write only the encoder, as ViTModel (also for non-pixel targets, non-square "
                             "grids, and fine-tunes with head.pool cls)")
    export.add_argument("--timm-name", help="timm architecture (default: inferred, e.g. vit_base_patch16_224)")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser("convert-checkpoint", help="gather a sharded fsdp checkpoint into one .pt file",
                             description="Read a DCP checkpoint directory written by runtime.strategy=fsdp "
                                         "(runs/NAME/last.dcp) in one process and write it as one checkpoint "
                                         "file with full tensors, the format ddp runs write (last.pt).")
    convert.add_argument("source", help="DCP checkpoint directory, e.g. runs/NAME/last.dcp")
    convert.add_argument("output", help="output file, e.g. runs/NAME/last.pt")
    convert.set_defaults(func=cmd_convert_checkpoint)

    export_cls = sub.add_parser("export-classifier",
                                help="write a fine-tuned classifier as TorchScript, ONNX and torch.export",
                                description="Export a finetune/linprobe checkpoint as OUT_DIR/classifier.pt "
                                            "(TorchScript), classifier.onnx and classifier.pt2 (torch.export, "
                                            "dynamic batch; torch.export.load(path).module()), inputs "
                                            "[B, *input_shape] normalised as the eval data -> logits; each is "
                                            "checked against PyTorch on a batch of another size. Classes and "
                                            "normalisation go to classifier.json.")
    export_cls.add_argument("checkpoint", help="runs/NAME/best.pt or last.pt of a finetune or linprobe run")
    export_cls.add_argument("out_dir", help="output folder")
    export_cls.add_argument("--ema", action="store_true", help="export the EMA weights (runs with `ema`)")
    export_cls.add_argument("--skip", action="append", default=[], choices=["torchscript", "onnx", "torch_export"],
                            help="leave out one format (repeatable)")
    export_cls.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed (1e-4)")
    export_cls.set_defaults(func=cmd_export_classifier)

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
    add_reconstruct_parser(sub)
    add_embed_parser(sub)
    add_plugin_commands(sub)
    return parser


def add_embed_parser(sub) -> None:
    emb = sub.add_parser("embed", help="encoder features of a dataset, folder or file list to safetensors",
                         description="Encode every sample with all tokens visible (the k-NN task's features) and "
                                     "write OUT as safetensors: features [N, D] (or [N, 1+L, D] with --pool all), "
                                     "labels [N] when the data has labels, and the source path of every row "
                                     "(header metadata 'paths', JSON; maeframe.load_embeddings reads all three). "
                                     "Resumable: chunks go to OUT.parts/ and a rerun skips finished ones. Under "
                                     "torchrun each process embeds every N-th chunk.")
    emb.add_argument("weights", help="maeframe checkpoint (pretraining or fine-tuning) or reference weights")
    emb.add_argument("data", help="recipe (.yaml: its data section), folder, or list (.txt paths; .csv with a path "
                                  "column and an optional integer label column)")
    emb.add_argument("--out", required=True, help="output .safetensors file")
    emb.add_argument("--format", default="auto", help="weight format (default auto: maeframe, else official_mae)")
    emb.add_argument("--split", default="train", choices=["train", "eval"], help="recipe DATA: data.train or data.eval")
    emb.add_argument("--pool", default="avg", choices=["avg", "cls", "all"],
                     help="avg: mean of the normed patch tokens (as k-NN); cls: the cls token; all: every token")
    emb.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    emb.add_argument("--batch-size", type=int, default=256, help="samples per encoder forward (256)")
    emb.add_argument("--chunk-size", type=int, default=4096, help="rows per resumable chunk file (4096)")
    emb.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding samples (0)")
    emb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field of the weights' recipe (repeatable), e.g. model.num_heads=16")
    emb.set_defaults(func=cmd_embed)


def add_reconstruct_parser(sub) -> None:
    rec = sub.add_parser("reconstruct", help="reconstruct your own images, videos or audio with pretrained weights",
                         description="Mask each input file, reconstruct it with a pretraining checkpoint (runs/NAME/"
                                     "last.pt or last.dcp/) or reference MAE weights, and write the training run's "
                                     "reconstruction panels (PNG; GIF for video; spectrogram PNG and WAVs for audio) "
                                     "and reconstruct.json (per input: masked-region loss as training computes it, "
                                     "mask ratio, files) to --out.")
    rec.add_argument("weights", help="maeframe pretraining checkpoint, or reference weights with their decoder")
    rec.add_argument("inputs", nargs="+", help="files to reconstruct, read with the weights' preprocessing")
    rec.add_argument("--out", required=True, help="output folder")
    rec.add_argument("--format", default="auto", help="weight format (default auto: maeframe checkpoint, else "
                                                      "official_mae); `maeframe plugins --kind weight_format`")
    rec.add_argument("--mask-ratio", type=float, help="set the masker's `ratio` option (default: the recipe's)")
    rec.add_argument("--masker", help="use this registered masker instead of the recipe's")
    rec.add_argument("--masker-option", action="append", default=[], metavar="KEY=VALUE",
                     help="an option of the masker (repeatable), e.g. ratio=0.5")
    rec.add_argument("--seed", type=int, default=0, help="seed of the drawn masks (default 0)")
    rec.add_argument("--mask-file", help="explicit mask: .npy/.pt/.txt of 0/1 per token in grid order (1 = hidden), "
                                         "one row for all inputs or one per input")
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field of the weights' recipe (repeatable), e.g. target.options.norm_pix=false")
    rec.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    rec.set_defaults(func=cmd_reconstruct)


def add_plugin_commands(sub) -> None:
    """Subcommands that plugins add through the `register_commands` hook, from the modules of the
    `maeframe_commands` entry-point group (light modules: `maeframe --help` imports no torch)."""
    from .plugins import make_command_manager

    make_command_manager().hook.register_commands(subparsers=sub)


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
