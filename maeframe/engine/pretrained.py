"""Weights a user points a tool at (`maeframe reconstruct`, `maeframe embed`): a maeframe checkpoint (a
`.pt` file or an fsdp run's `last.dcp/` directory) or another project's weights, read through a registered
`WeightFormat`. The format describes the weights as a recipe (`WeightFormat.recipe_for`: a checkpoint's own
recorded recipe, or the defaults of the reference architecture), so the tokenizer, target, losses and the
dataset preprocessing are known without a recipe file of the user's."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..build import Prepared, prepare
from ..errors import MaeframeError, PluginError, RecipeError
from ..interop.official_mae import InteropError
from ..model import MaskedAutoencoder
from ..plugins import make_plugin_manager
from ..recipe import parse_recipe
from ..recipe_file import apply_override
from ..registry import Registry
from ..weights import EncoderLayout, WeightFormat
from .checkpoint import FORMAT, checkpoint_entry

AUTO = "auto"


@dataclass
class Weights:
    """A weights file or directory with its format and the recipe tree that describes it."""

    path: Path
    format: str                 # the registered weight format's name, e.g. "maeframe", "official_mae"
    reader: WeightFormat
    tree: dict[str, Any]        # the recipe (plain values) the format reports for these weights
    layout: EncoderLayout       # how the model runs these weights (`WeightFormat.layout_for`)

    @property
    def task(self) -> str:
        return self.tree.get("task", "pretrain")


def detect_format(path: Path) -> str:
    """"maeframe" for a maeframe checkpoint (a DCP directory, or a file with maeframe's format tag), else
    "official_mae" (the reference MAE layout; other layouts are named with --format)."""
    if path.is_dir():
        return "maeframe"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (or unpicklable): the reference reader reports why
        return "official_mae"
    return "maeframe" if isinstance(state, dict) and state.get("format") == FORMAT else "official_mae"


def open_weights(path: str | Path, format: str = AUTO) -> Weights:
    """The weights at `path` with their format (`auto`: `detect_format`) and the recipe it reports."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {str(path)!r} do not exist")
    name = detect_format(path) if format == AUTO else format
    registry = Registry(make_plugin_manager(()))
    try:
        entry = registry.get("weight_format", name)
    except PluginError as err:
        raise MaeframeError(f"--format: {err}") from None
    reader = entry.cls(entry.cls.Options())
    if path.is_dir() and not reader.reads_directories:
        raise MaeframeError(f"{path} is a directory; weight format {name!r} reads files")
    try:
        tree = reader.recipe_for(path)
    except (InteropError, ValueError) as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise MaeframeError(f"{message} (read as weight format {name!r}; choose another with --format)") from None
    try:
        layout = reader.layout_for(path)
    except (InteropError, ValueError) as err:
        raise MaeframeError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
    return Weights(path, name, reader, copy.deepcopy(tree), layout)


def prepare_tree(weights: Weights, tree: dict[str, Any], overrides: list[str] = ()) -> Prepared:
    """`prepare` the recipe tree (after `overrides`, dotted key=value), errors naming the weights."""
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    source = f"{weights.path} (its recipe)"
    try:
        prepared = prepare(parse_recipe(tree, source), layout=weights.layout)
    except RecipeError as err:
        raise RecipeError(err.problems, source) from None
    prepared.source = source
    return prepared


def load_autoencoder(weights: Weights, prepared: Prepared) -> MaskedAutoencoder:
    """The recipe's MaskedAutoencoder (in the format's layout) with every tensor (encoder and decoder) from the
    weights (`WeightFormat.read_autoencoder`), in eval mode.
    Weights that do not fit (names or shapes) are an error naming the file and the first differences."""
    recipe, components = prepared.recipe, prepared.components
    model = MaskedAutoencoder(components.tokenizer.spec, components.target.out_dim, recipe.model, weights.layout)
    try:
        state = weights.reader.read_autoencoder(weights.path, components.tokenizer.spec, recipe.model,
                                                recipe.tokenizer.options)
    except (InteropError, ValueError) as err:
        raise MaeframeError(str(err) if str(weights.path) in str(err) else f"{weights.path}: {err}") from None
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    mismatched = [f"{key}: weights {list(state[key].shape)} vs model {list(value.shape)}"
                  for key, value in own.items() if key in state and state[key].shape != value.shape]
    if missing or unexpected or mismatched:
        decoder = " (the weights hold no decoder: reconstruction needs pretraining weights with one)" \
            if missing and all(key.startswith("decoder.") for key in missing) else ""
        details = "; ".join([*mismatched[:4], *([f"missing {missing[:6]}"] if missing else []),
                             *([f"unexpected {unexpected[:6]}"] if unexpected else [])])
        raise MaeframeError(f"{weights.path}: the weights do not fit the model its recipe describes{decoder}: "
                            f"{details}")
    model.load_state_dict({key: state[key] for key in own})
    for component in components.all():
        component.attach(model)
    return model.eval()


def restore_component_states(weights: Weights, prepared: Prepared, masker_changed: bool) -> None:
    """A maeframe checkpoint's component states (e.g. an EMA teacher target, a masking schedule's position)
    into the prepared components; the masker's only when it is still the checkpoint's."""
    if weights.format != "maeframe":
        return
    saved = checkpoint_entry(weights.path, "components") or {}
    c = prepared.components
    parts = {"target": ("target", c.target), **{f"loss.{i}": (f"losses.{i}", loss) for i, (_, _, loss) in
                                                enumerate(c.losses)}}
    if not masker_changed:
        parts["masker"] = ("masker", c.masker)
    for key, (field, part) in parts.items():
        if key in saved:
            part.load_versioned_state(saved[key], field)
