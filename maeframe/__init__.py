"""maeframe: masked-autoencoder pretraining for images, video and audio, extended through plugins.

The public plugin API is what this module exports: the component bases, the records passed between
stages, and `hookimpl`. The names that need torch are imported on first use (PEP 562), so that the CLI
can parse its arguments and print `--help` without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import MaeframeError, OptionError, PluginError, RecipeError
from .hookspecs import hookimpl

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` imports these on first use
    from .component import Component, Options
    from .dataset import Dataset
    from .loss import CrossModalLoss, Loss, Prediction, masked_mean
    from .masker import Mask, Masker, visible_count
    from .target import PatchValues, Target, TargetOut
    from .build import prepare
    from .registry import build_component, component_class
    from .run_logger import RunLogger, RunStart
    from .seeding import python_numpy_seeded
    from .weights import EncoderLayout, WeightFormat
    from .model.pos_embed import flat_sincos_pos_embed
    from .model.mae import recipe_layout
    from .engine.distributed import all_rank_rows
    from .tokenizer import Tokenizer, Tokens, TokenSpec, as_pair
    from .engine.reconstruct import reconstruct
    from .engine.embed import embed
    from .engine.embed_store import load_embeddings

__version__ = "0.1.0"

_LAZY = {  # public name -> submodule defining it (each imports torch)
    "Component": "component", "Options": "component", "Dataset": "dataset", "Loss": "loss",
    "Prediction": "loss", "masked_mean": "loss", "CrossModalLoss": "loss", "Mask": "masker", "Masker": "masker",
    "visible_count": "masker", "Target": "target", "TargetOut": "target", "PatchValues": "target",
    "Tokenizer": "tokenizer", "Tokens": "tokenizer", "TokenSpec": "tokenizer", "as_pair": "tokenizer", "python_numpy_seeded": "seeding",
    "prepare": "build", "build_component": "registry", "component_class": "registry",
    "WeightFormat": "weights", "EncoderLayout": "weights", "all_rank_rows": "engine.distributed",
    "flat_sincos_pos_embed": "model.pos_embed", "recipe_layout": "model.mae", "RunLogger": "run_logger", "RunStart": "run_logger",
    # tools for notebooks: the engine behind `maeframe reconstruct` and `maeframe embed`
    "reconstruct": "engine.reconstruct", "embed": "engine.embed", "load_embeddings": "engine.embed_store",
}
__all__ = [*_LAZY, "hookimpl", "MaeframeError", "OptionError", "PluginError", "RecipeError"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'maeframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
