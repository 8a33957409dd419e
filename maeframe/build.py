"""From a recipe file to validated, constructed components (used by `validate` and by every engine)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pluggy

from .component import Component
from .dataset import Dataset
from .errors import RecipeError
from .loss import Loss
from .masker import Masker
from .model.windowed import resolve_window
from .plugins import make_plugin_manager
from .recipe import RECIPE_TYPES, AnyRecipe, load_recipe, resolve_options
from .registry import Registry
from .target import Target
from .tokenizer import Tokenizer


@dataclass
class Components:
    """The per-step objects a recipe selects. losses: (label, weight, loss) in recipe order; the label is
    the loss name, or "name.i" when a name appears twice (metrics are logged as loss/<label>).
    Downstream recipes (finetune, linprobe, knn) have only a tokenizer: masker and target are None."""

    tokenizer: Tokenizer
    masker: Masker | None
    target: Target | None
    losses: list[tuple[str, float, Loss]]

    def all(self) -> list[Component]:
        parts = [self.tokenizer, self.masker, self.target, *(loss for _, _, loss in self.losses)]
        return [part for part in parts if part is not None]


@dataclass
class Prepared:
    recipe: AnyRecipe
    pm: pluggy.PluginManager
    registry: Registry
    components: Components


def _construct(path: str, factory, *args):
    try:
        return factory(*args)
    except (ValueError, TypeError) as err:
        raise RecipeError([(path, f"{type(err).__name__}: {err}")]) from err


def prepare(recipe: AnyRecipe | str | Path, overrides: list[str] = ()) -> Prepared:
    """Validate a recipe fully (schema, component options, construction, plugin checks) and build the
    per-step components. Touches no data and writes nothing."""
    source = "recipe"
    if not isinstance(recipe, RECIPE_TYPES):
        source = str(recipe)
        recipe = load_recipe(recipe, overrides)
    pm = make_plugin_manager(recipe.plugins)
    registry = Registry(pm)
    try:
        with registry.active():
            return _prepare(recipe, pm, registry)
    except RecipeError as err:
        raise RecipeError(err.problems, source) from err


def _prepare(recipe: AnyRecipe, pm: pluggy.PluginManager, registry: Registry) -> Prepared:
    options = resolve_options(recipe, registry)
    get = lambda kind, ref: registry.get(kind, ref.name).cls  # noqa: E731
    _check_repeats(recipe, options, get)
    tokenizer = _construct("tokenizer", get("tokenizer", recipe.tokenizer), options["tokenizer"])
    if recipe.task != "pretrain":
        # finetune / linprobe / knn need the tokenizer only; `validate_recipe` hooks inspect pretraining
        # recipes (masker, target, losses) and are not called for them
        return Prepared(recipe, pm, registry, Components(tokenizer, None, None, []))
    model = recipe.model
    if model.decoder_attention == "local":
        shift = model.decoder_window_shift or tuple(w // 2 for w in model.decoder_window)
        _construct("model.decoder_window", resolve_window, tokenizer.spec.grid, model.decoder_window, shift)
    masker = _construct("masker", get("masker", recipe.masker), options["masker"], tokenizer.spec)
    target = _construct("target", get("target", recipe.target), options["target"], tokenizer)
    names = [ref.name for ref in recipe.losses]
    labels = [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]
    losses = [(label, ref.weight,
               _construct(f"losses.{i}", get("loss", ref), options[f"losses.{i}"], tokenizer))
              for i, (label, ref) in enumerate(zip(labels, recipe.losses))]
    _run_validate_hook(pm, recipe)
    return Prepared(recipe, pm, registry, Components(tokenizer, masker, target, losses))


def _check_repeats(recipe: AnyRecipe, options: dict, get) -> None:
    """Repeated sampling (`Dataset.item_repeats`): a training batch holds whole items of k samples, and
    evaluation data is never repeated (it would silently do nothing)."""
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


def _run_validate_hook(pm: pluggy.PluginManager, recipe: AnyRecipe) -> None:
    for impl in pm.hook.validate_recipe.get_hookimpls():
        try:
            impl.function(recipe=recipe)
        except ValueError as err:
            path, sep, message = str(err).partition(": ")
            raise RecipeError([(path, message) if sep else ("recipe", str(err))]) from err


def build_dataset(prepared: Prepared, split: str = "train", augment: bool | None = None) -> Dataset:
    """The training dataset (augmented), or with split="eval" the held-out one (`data.eval`, else the
    training data without augmentation), at the tokenizer's input shape. `augment` overrides the
    split's default (e.g. the training set without augmentation for a k-NN feature bank)."""
    data = prepared.recipe.data
    path, ref = ("data.eval", data.eval) if split == "eval" and data.eval is not None else ("data.train", data.train)
    entry = prepared.registry.get("dataset", ref.name)
    options = entry.cls.Options.model_validate(ref.options)
    try:
        return entry.cls(options, prepared.components.tokenizer.input_shape,
                         split == "train" if augment is None else augment)
    except ValueError as err:
        raise RecipeError([(path, str(err))]) from err


