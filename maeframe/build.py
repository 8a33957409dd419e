"""From a recipe file to validated, constructed components (used by `validate` and by every engine)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from .component import Component
from .dataset import Dataset
from .errors import OptionError, PluginError, RecipeError
from .loss import CrossModalLoss, Loss
from .masker import Masker
from .model.mae import recipe_layout
from .model.windowed import resolve_window
from .plugins import make_plugin_manager
from .recipe import RECIPE_TYPES, AnyRecipe, ComponentRef, RuntimeConfig, load_recipe, resolve_options
from .registry import Registry
from .target import Target
from .tokenizer import Tokenizer
from .weights import EncoderLayout, WeightFormat

log = logging.getLogger("maeframe.plugins")


@dataclass
class Components:
    """The per-step objects a recipe selects. losses: (label, weight, loss) in recipe order; the label is
    the loss name, or "name.i" when a name appears twice (metrics are logged as loss/<label>).
    Downstream recipes (finetune, linprobe, knn) have a tokenizer and the reader of their `init.format`
    (None for `none`): masker and target are None. `all()` lists the per-step components."""

    tokenizer: Tokenizer
    masker: Masker | None
    target: Target | None
    losses: list[tuple[str, float, Loss]]
    weight_format: WeightFormat | None = None

    def all(self) -> list[Component]:
        parts = [self.tokenizer, self.masker, self.target, *(loss for _, _, loss in self.losses)]
        return [part for part in parts if part is not None]


@dataclass
class Prepared:
    recipe: AnyRecipe
    pm: pluggy.PluginManager
    registry: Registry
    # the recipe's flow; for a joint recipe the flow of its FIRST modality (what a listing such as `validate`
    # shows first), while `modalities` holds them all: code that works on one flow checks `joint` and refuses
    # joint recipes rather than silently taking the first modality (compare, image-stats, audio-stats do)
    components: Components
    source: str = "recipe"  # the recipe file, named in errors found later (datasets, check_data)
    # a joint recipe (`modalities`): {modality name: its Components}, in recipe order, and the cross-modal losses
    # (label, weight, loss) of `joint_losses`; empty for single-modality recipes
    modalities: dict[str, Components] = field(default_factory=dict)
    joint_losses: list[tuple[str, float, CrossModalLoss]] = field(default_factory=list)

    @property
    def joint(self) -> bool:
        return bool(self.modalities)

    def all_components(self) -> list[tuple[str, Component]]:
        """(metric prefix, component) of every per-step component: "" for a single-modality recipe,
        "<modality>/" per modality and "joint/" for the cross-modal losses of a joint one."""
        if not self.joint:
            return [("", part) for part in self.components.all()]
        parts = [(f"{name}/", part) for name, c in self.modalities.items() for part in c.all()]
        return parts + [("joint/", loss) for _, _, loss in self.joint_losses]

    def provenance(self) -> dict[str, dict[str, str | None]]:
        """Plugin, distribution, version and class of every component the recipe uses, by field path
        (`Registry.provenance`); run.json and every checkpoint record it under "plugins"."""
        return self.registry.provenance(self.recipe)


def provenance_changes(saved: dict[str, dict[str, Any]] | None, current: dict[str, dict[str, Any]]) -> list[str]:
    """What changed in the components' provenance since a checkpoint was written: one line per component
    whose plugin, distribution, version or class differs (checkpoints written before provenance was
    recorded give none)."""
    changes = []
    for path, now in current.items():
        then = (saved or {}).get(path)
        if not then or then.get("name") != now["name"]:
            continue  # a new or renamed component is a recipe change, not a plugin upgrade
        what = [f"{key} {then.get(key)} -> {now[key]}" for key in ("plugin", "distribution", "version", "module")
                if then.get(key) != now[key]]
        if what:
            changes.append(f"{path} {now['name']!r} (plugin {now['plugin']}): " + ", ".join(what))
    return changes


def warn_provenance_changes(saved: dict[str, dict[str, Any]] | None, current: dict[str, dict[str, Any]],
                            checkpoint: Any) -> None:
    """Log a warning per component whose plugin version (or plugin, distribution, class) changed since
    `checkpoint` was written: the resumed run goes on with code that did not start it."""
    for change in provenance_changes(saved, current):
        log.warning("resuming from %s written with another plugin version: %s", checkpoint, change)


def _construct(path: str, factory, *args):
    """factory(*args); its ValueError/TypeError as a RecipeError at `path` (an OptionError at the option)."""
    try:
        return factory(*args)
    except OptionError as err:
        raise RecipeError([(f"{path}.options.{err.field}", err.message)]) from err
    except (ValueError, TypeError) as err:
        raise RecipeError([(path, f"{type(err).__name__}: {err}")]) from err


def prepare(recipe: AnyRecipe | str | Path, overrides: list[str] = (), layout: EncoderLayout | None = None) -> Prepared:
    """Validate a recipe fully (schema, component options, construction, plugin checks) and build the
    per-step components. Touches no data and writes nothing. `layout`: the one the model will run in (another
    project's weights; None: the pretraining recipe's own, `model.cls_token` / `model.positions`), handed to
    the `validate_recipe` hooks."""
    source = "recipe"
    if not isinstance(recipe, RECIPE_TYPES):
        source = str(recipe)
        recipe = load_recipe(recipe, overrides)
    pm = make_plugin_manager(recipe.plugins)
    registry = Registry(pm)
    try:
        with registry.active():
            prepared = _prepare(recipe, pm, registry, layout)
    except RecipeError as err:
        raise RecipeError(err.problems, source) from err
    prepared.source = source
    return prepared


def _prepare(recipe: AnyRecipe, pm: pluggy.PluginManager, registry: Registry, layout: EncoderLayout | None) -> Prepared:
    options = resolve_options(recipe, registry)
    get = lambda kind, ref: registry.get(kind, ref.name).cls  # noqa: E731
    _check_loggers(recipe, options, get)
    if getattr(recipe, "modalities", None) is not None:
        from .build_joint import prepare_modalities

        modalities, joint_losses = prepare_modalities(recipe, options, get)
        if not recipe.model.cls_token or recipe.model.positions != "axes" or not recipe.model.decoder_embed_bias:
            raise RecipeError([("model", "a joint recipe (modalities) runs maeframe's own layout: leave "
                                         "model.cls_token, model.positions and model.decoder_embed_bias at their "
                                         "defaults")])
        _run_validate_hook(pm, recipe, layout or recipe_layout(recipe.model))
        return Prepared(recipe, pm, registry, next(iter(modalities.values())), modalities=modalities,
                        joint_losses=joint_losses)
    if recipe.task == "retrieval":  # tokenizers and model come from init.checkpoint's recipe, read by the task
        return Prepared(recipe, pm, registry, None)
    check_repeats(recipe, options, get)
    tokenizer = _construct("tokenizer", get("tokenizer", recipe.tokenizer), options["tokenizer"])
    if recipe.task != "pretrain":
        # finetune / linprobe / knn need the tokenizer and the weights' reader; `validate_recipe` hooks
        # inspect pretraining recipes (masker, target, losses) and are not called for them
        fmt = None
        if recipe.init.format != "none":
            try:
                entry = registry.get("weight_format", recipe.init.format)
            except PluginError as err:
                raise RecipeError([("init.format", str(err))]) from None
            fmt = entry.cls(entry.cls.Options())
        return Prepared(recipe, pm, registry, Components(tokenizer, None, None, [], fmt))
    components = build_flow("", recipe, recipe, tokenizer, options, get)
    layout = layout or recipe_layout(recipe.model)
    if recipe.monitor is not None and recipe.monitor.pool == "cls" and not layout.cls_token:
        raise RecipeError([("monitor.pool", "cls, but the encoder has no cls token (model.cls_token: false); "
                                            "use avg")])
    _run_validate_hook(pm, recipe, layout)
    return Prepared(recipe, pm, registry, components)


def build_flow(prefix: str, recipe: AnyRecipe, refs, tokenizer: Tokenizer, options: dict, get) -> Components:
    """The masker, target and losses that `refs` (the recipe, or one of its modalities) names, constructed for
    `tokenizer`; `prefix` ("" or "modalities.<name>.") starts their field paths in errors."""
    model = recipe.model
    if not model.cls_token and model.decoder_attention == "local":
        raise RecipeError([("model.cls_token", "false needs decoder_attention: global (local decoder blocks expect "
                                               "the cls token)")])
    if model.decoder_attention == "local":
        shift = model.decoder_window_shift or tuple(w // 2 for w in model.decoder_window)
        _construct("model.decoder_window", resolve_window, tokenizer.spec.grid, model.decoder_window, shift)
    masker = _construct(f"{prefix}masker", get("masker", refs.masker), options[f"{prefix}masker"], tokenizer.spec)
    _construct(f"{prefix}masker", masker.check_counts)  # a hidden and a visible token on this grid, or NaN loss
    target = _construct(f"{prefix}target", get("target", refs.target), options[f"{prefix}target"], tokenizer)
    names = [ref.name for ref in refs.losses]
    labels = [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]
    losses = []
    for i, (label, ref) in enumerate(zip(labels, refs.losses)):
        cls = get("loss", ref)
        if not issubclass(cls, Loss):
            raise RecipeError([(f"{prefix}losses.{i}.name", f"{ref.name!r} is a cross-modal loss (it compares "
                                                            f"modalities); name it in joint_losses")])
        losses.append((label, ref.weight, _construct(f"{prefix}losses.{i}", cls, options[f"{prefix}losses.{i}"],
                                                     tokenizer)))
    return Components(tokenizer, masker, target, losses)


def _check_loggers(recipe: AnyRecipe, options: dict, get) -> None:
    """The recipe's trackers construct (their options), are each listed once and have the packages they need."""
    seen = {}
    for i, ref in enumerate(recipe.runtime.loggers):
        path = f"runtime.loggers.{i}"
        if ref.name in seen:
            raise RecipeError([(path, f"{ref.name} is already runtime.loggers.{seen[ref.name]}; list each "
                                      f"tracker once")])
        seen[ref.name] = i
        logger = _construct(path, get("logger", ref), options[path])
        missing = logger.missing()
        if missing:
            verb, them = ("is", "it") if len(missing) == 1 else ("are", "them")
            command = f"pip install '{logger.install}'" if logger.install else f"pip install {' '.join(missing)}"
            raise RecipeError([(path, f"{', '.join(missing)} {verb} not installed (logger {ref.name} needs "
                                      f"{them}); {command}")])


def check_repeats(recipe: AnyRecipe, options: dict, get) -> None:
    """Repeated sampling (`Dataset.item_repeats`): a training batch holds whole items of k samples, and
    evaluation data is never repeated (it would silently do nothing)."""
    for split in ("train", "eval"):
        ref = getattr(recipe.data, split)
        if ref is not None and get("dataset", ref).paired:
            raise RecipeError([(f"data.{split}.name", f"dataset {ref.name!r} yields several modalities per sample "
                                                      f"(Dataset.paired); it serves joint recipes with mixing: paired")])
    repeats = get("dataset", recipe.data.train).item_repeats(options["data.train"])
    if recipe.task == "knn" and repeats > 1:
        raise RecipeError([("data.train.options.repeats", "a knn run embeds each training item once, without "
                                                          "augmentation; repeated sampling would do nothing "
                                                          "(remove it)")])
    if recipe.data.batch_size % repeats:
        raise RecipeError([("data.batch_size", f"{recipe.data.batch_size} is not a multiple of "
                                               f"data.train.options.repeats {repeats}: a batch holds whole items of "
                                               f"{repeats} samples (one read each)")])
    if recipe.data.eval is not None and get("dataset", recipe.data.eval).item_repeats(options["data.eval"]) > 1:
        raise RecipeError([("data.eval.options.repeats", "repeated sampling applies to training data only; "
                                                         "evaluation takes one sample per item (remove it)")])


def _run_validate_hook(pm: pluggy.PluginManager, recipe: AnyRecipe, layout: EncoderLayout) -> None:
    given = {"recipe": recipe, "layout": layout}
    for impl in pm.hook.validate_recipe.get_hookimpls():
        try:
            impl.function(**{name: given[name] for name in impl.argnames})  # an impl may take a subset
        except ValueError as err:
            path, sep, message = str(err).partition(": ")
            raise RecipeError([(path, message) if sep else ("recipe", str(err))]) from err


def build_dataset(prepared: Prepared, split: str = "train", augment: bool | None = None,
                  modality: str | None = None) -> Dataset:
    """The training dataset (augmented), or with split="eval" the held-out one (`data.eval`, else the
    training data without augmentation), at the tokenizer's input shape. `augment` overrides the
    split's default (e.g. the training set without augmentation for a k-NN feature bank). A joint recipe:
    with `modality` (mixing: alternate) that modality's own data (`modalities.<name>.data`) at its tokenizer's
    input shape; without it (mixing: paired) the top-level data, built with {modality: input shape}."""
    data = prepared.recipe.data
    field = "data"
    if modality is not None:
        data, field = prepared.recipe.modalities[modality].data, f"modalities.{modality}.data"
        input_shape = prepared.modalities[modality].tokenizer.input_shape
    elif prepared.joint:
        input_shape = {name: c.tokenizer.input_shape for name, c in prepared.modalities.items()}
    else:
        input_shape = prepared.components.tokenizer.input_shape
    path, ref = (f"{field}.eval", data.eval) if split == "eval" and data.eval is not None else (f"{field}.train", data.train)
    entry = prepared.registry.get("dataset", ref.name)
    options = entry.cls.Options.model_validate(ref.options)
    try:
        return entry.cls(options, input_shape, split == "train" if augment is None else augment)
    except OptionError as err:  # the dataset names its option
        raise RecipeError([(f"{path}.options.{err.field}", err.message)], prepared.source) from err
    except (ValueError, OSError) as err:  # OSError: a root, list or file that is missing or unreadable
        raise RecipeError([(_option_named_in(path, ref, str(err)), str(err))], prepared.source) from err


def _option_named_in(path: str, ref: ComponentRef, message: str) -> str:
    """`path.options.<name>` of the option whose value the message quotes as a path of its own (not inside
    another word or path), e.g. a missing root; else `path`. The longest quoted value wins."""
    quoted = [(len(text), name) for name, value in ref.options.items() if isinstance(value, str) and value
              for text in {value, os.path.expanduser(value)}
              if re.search(rf"(?<![\w/.-]){re.escape(text)}(?![\w.-])", message)]
    return f"{path}.options.{max(quoted)[1]}" if quoted else path


# --- checks of the machine and the data (`maeframe validate --data`) ------------------------------

def check_data(prepared: Prepared) -> list[tuple[str, str]]:
    """What a run needs beyond a valid recipe, checked before anything is written: the device exists, the
    run directory can be created and written, every dataset builds (roots and files exist) and the training
    set holds the samples of one optimizer step. Returns (field path, message) pairs, [] when all is well.

    Builds the datasets as a run does (listing files, reading headers where the dataset plugin does), but
    loads no batch, imports no model and creates nothing. `maeframe validate --data` prints these; a run's
    entry point calls `require_data(prepared)` to stop with them before it writes anything."""
    recipe = prepared.recipe
    problems = _check_device(recipe.runtime) + _check_output_dir(recipe.runtime.output_dir, recipe.name)
    if recipe.task == "retrieval":  # its datasets take the input shapes of init.checkpoint's recipe: built by the task
        return problems if Path(recipe.init.checkpoint).expanduser().exists() else problems + [
            ("init.checkpoint", f"{recipe.init.checkpoint} does not exist")]
    alternate = [name for name in prepared.modalities if recipe.modalities[name].data is not None]
    for modality in alternate or [None]:
        data, field = (recipe.modalities[modality].data, f"modalities.{modality}.data") if modality else (recipe.data, "data")
        for split in ("train", "eval"):
            if split == "eval" and data.eval is None:
                continue  # evaluation reuses the training data
            try:
                dataset = build_dataset(prepared, split, modality=modality)
            except RecipeError as err:
                problems += err.problems
                continue
            unreadable = dataset.unreadable()
            if split == "eval":
                continue
            if len(unreadable) > recipe.data.max_bad_fraction * (len(dataset) + len(unreadable)):
                problems.append(("data.max_bad_fraction", f"{len(unreadable)} of {len(dataset) + len(unreadable)} "
                                                          f"files of {field}.train cannot be read (first: "
                                                          f"{unreadable[0]})"))
            problems += _check_step_fits(recipe, len(dataset), data.train.name, f"{field}.train")
    return problems


def require_data(prepared: Prepared) -> None:
    """`check_data` as one RecipeError naming the recipe file and every problem (nothing when all is well)."""
    problems = check_data(prepared)
    if problems:
        raise RecipeError(problems, prepared.source)


def _check_device(runtime: RuntimeConfig) -> list[tuple[str, str]]:
    if runtime.device != "cuda":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [("runtime.device", "'cuda', but torch sees no CUDA device on this machine (no GPU, no driver, or a "
                               "CPU-only torch build); use auto (CUDA when available) or cpu")]


def _check_output_dir(output_dir: str, name: str) -> list[tuple[str, str]]:
    """The run directory <output_dir>/<name> exists as a directory or can be created, and is writable."""
    run = Path(output_dir).expanduser() / name
    existing = next((path for path in (run, *run.parents) if path.exists()), Path("."))  # the nearest that exists
    if not existing.is_dir():
        what = "runtime.output_dir" if existing != run else "name"
        return [(what, f"{existing} exists and is a file, not a directory, so the run directory {run} cannot "
                       f"be created; choose another runtime.output_dir{' or name' if what == 'name' else ''}")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("runtime.output_dir", f"{existing} is not writable by this user, so the run directory {run} "
                                       f"cannot be {'written' if existing == run else 'created'}")]
    return []


def _check_step_fits(recipe: AnyRecipe, size: int, name: str, field: str = "data.train") -> list[tuple[str, str]]:
    """A training epoch has at least one full optimizer step (the sampler drops partial batches)."""
    optim: Any = getattr(recipe, "optim", None)
    if optim is None:  # k-NN: features are computed in batches of any size
        return []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = recipe.data.batch_size * optim.accum_steps * world
    if size >= need:
        return []
    factors = f"data.batch_size {recipe.data.batch_size} × optim.accum_steps {optim.accum_steps}"
    factors += f" × {world} processes" if world > 1 else ""
    return [("data.batch_size", f"one optimizer step takes {factors} = {need} samples, but {field} "
                                f"({name}) holds {size}: not one full step per epoch; lower "
                                f"data.batch_size or optim.accum_steps")]


