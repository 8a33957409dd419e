"""A user's image files, one by one, with a recipe's evaluation preprocessing (`Dataset.from_files` of every
image dataset): what `maeframe reconstruct` and `maeframe embed` read."""
from __future__ import annotations

from .folders import preprocessing_options
from .image_data import ImageAugmentOptions
from .image_decode import DecodeOptions
from .image_files import FileListDataset

LOCATING = ("root", "list", "split", "limit", "extensions", "follow_links", "path_column", "label_column")


class ImageReaderOptions(ImageAugmentOptions, DecodeOptions):
    """Normalisation (mean, std, stats_file) and decoding (background, alpha, max_pixels) of the recipe."""


class ImageFileReader(FileListDataset):
    """Exactly the given image paths, in order, resized and centre-cropped to the input shape (no augmentation);
    label i is labels[i] (or -1)."""

    Options = ImageReaderOptions

    @classmethod
    def for_paths(cls, options: dict, input_shape: tuple[int, ...], paths: list[str],
                  labels: list[int] | None = None) -> ImageFileReader:
        reader = cls(preprocessing_options(options, ImageReaderOptions, LOCATING), input_shape, False)
        reader.paths = [str(path) for path in paths]
        reader.labels = list(labels) if labels is not None else [-1] * len(reader.paths)
        return reader
