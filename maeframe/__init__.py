"""maeframe: masked-autoencoder pretraining for images, video and audio, extended through plugins.

The public plugin API is what this module exports: the component bases, the records passed between
stages, and `hookimpl`.
"""
from .component import Component, Options
from .dataset import Dataset
from .errors import MaeframeError, PluginError, RecipeError
from .hookspecs import hookimpl
from .loss import Loss, Prediction, masked_mean
from .masker import Mask, Masker, visible_count
from .target import Target, TargetOut
from .tokenizer import Tokenizer, Tokens, TokenSpec, as_pair

__version__ = "0.1.0"
__all__ = [
    "Component", "Options", "Dataset", "Loss", "Prediction", "masked_mean", "Mask", "Masker", "visible_count",
    "Target", "TargetOut", "Tokenizer", "Tokens", "TokenSpec", "as_pair", "hookimpl", "MaeframeError", "PluginError",
    "RecipeError",
]
