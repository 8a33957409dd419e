"""The `maeframe` command: one small function per subcommand."""
from __future__ import annotations

import argparse
import sys

from .errors import MaeframeError


def cmd_run(args: argparse.Namespace) -> int:
    """Validate fully before anything is written, then train."""
    from .build import prepare
    from .engine.pretrain import Pretrainer

    prepared = prepare(args.recipe, args.overrides)
    trainer = Pretrainer(prepared, resume=args.resume)
    metrics = trainer.train()
    loss = f"{metrics['loss']:.4f}" if "loss" in metrics else "n/a"
    print(f"finished at step {trainer.step}: loss {loss}; run directory {trainer.run_dir.path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .build import prepare

    failed = 0
    for path in args.recipes:
        try:
            prepared = prepare(path, args.overrides)
        except MaeframeError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        spec = prepared.components.tokenizer.spec
        print(f"{path}: ok ({prepared.recipe.name}: grid {spec.grid}, {spec.num_tokens} tokens of {spec.patch_dim})")
    return 1 if failed else 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import make_plugin_manager, plugin_distribution
    from .registry import Registry

    pm = make_plugin_manager(args.module)
    registry = Registry(pm)
    for kind, table in registry.entries.items():
        print(f"{kind}{'es' if kind.endswith('s') else 's'}:")
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

    path, name = export_encoder(args.checkpoint, args.output, args.timm_name)
    print(f"wrote {path}; load it with timm.create_model({name!r}, pretrained=True, num_classes=0, "
          f"pretrained_cfg_overlay={{'file': {str(path)!r}}})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maeframe", description="Masked-autoencoder pretraining from recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe; fields can be overridden.")
    run.add_argument("recipe", help="path to a YAML recipe")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.epochs=5")
    run.add_argument("--resume", action="store_true", help="continue <output_dir>/<name>/last.pt exactly")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check recipes without running them",
                              description="Check recipes (schema, component options, plugins); write nothing.")
    validate.add_argument("recipes", nargs="+", help="YAML recipes")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override applied to every recipe (repeatable)")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list components by kind with plugin and options",
                             description="List every registered component, its plugin and its options.")
    plugins.add_argument("--module", action="append", default=[], help="also load this plugin module")
    plugins.set_defaults(func=cmd_plugins)

    export = sub.add_parser("export", help="write the encoder as timm-loadable safetensors",
                            description="Export a checkpoint's encoder to safetensors in timm's ViT layout.")
    export.add_argument("checkpoint", help="maeframe checkpoint (e.g. runs/NAME/last.pt) or official MAE .pth")
    export.add_argument("output", help="output .safetensors path")
    export.add_argument("--timm-name", help="timm architecture (default: inferred, e.g. vit_base_patch16_224)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MaeframeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
