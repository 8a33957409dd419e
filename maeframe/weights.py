"""Pretrained encoder weights in other projects' file formats: `WeightFormat` components, selected by a
downstream recipe's `init.format` and supplied by plugins (`register_weight_formats`), as the built-in
maeframe, official MAE, VideoMAE and AudioMAE readers are."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import Tensor

from .component import Component
from .tokenizer import TokenSpec


@dataclass(frozen=True)
class EncoderLayout:
    """How the encoder (and a masked autoencoder's decoder) must run to use a format's weights. cls_token:
    whether the encoder has one (without it, every token is encoded and features are their mean; the decoder
    then sees the grid tokens alone); positions: (num_tokens, width) -> [num_tokens, width], a fixed position
    table replacing the per-axis sin-cos one of the token grid (None: sin-cos), at the encoder's and at the
    decoder's width."""

    cls_token: bool = True
    positions: Callable[[int, int], Tensor] | None = None


class WeightFormat(Component):
    """Reads a file of pretrained weights into maeframe's encoder names (`encoder.patch_embed.*`,
    `encoder.cls_token`, `encoder.blocks.{i}.*`, `encoder.norm.*`). Constructed with its (empty) options."""

    kind = "weight_format"
    reads_directories: ClassVar[bool] = False  # True: `init.checkpoint` may be a directory (a DCP checkpoint)

    @property
    def layout(self) -> EncoderLayout:
        """The encoder layout these weights need; default: maeframe's (cls token, sin-cos positions)."""
        return EncoderLayout()

    def layout_for(self, path: Path) -> EncoderLayout:
        """The encoder layout the weights at `path` need, for formats whose files differ in layout (a maeframe
        checkpoint records the one it was trained in); default: `layout`, the same for every file."""
        return self.layout

    def to_transformers(self, model: dict[str, Tensor], prepared: Any, layout: EncoderLayout,
                        encoder_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """`maeframe export --format hf` of a checkpoint that is not a 2-D ViT with cls token and sin-cos (those
        export as ViTMAE / ViT in the core): the checkpoint's `model` tensors (maeframe names), its recipe
        `prepared` (a `maeframe.build.Prepared`) and the `layout` it trained in -> (config.json as a dict,
        {tensor name: tensor} of model.safetensors) for this format's transformers class, the decoder included
        unless `encoder_only`. None: the checkpoint is not of this format's kind (e.g. another token grid); an
        InteropError naming what to set in the recipe: it is, but transformers would compute something else.
        Default: None (the format writes no transformers directories)."""
        return None

    def recipe_for(self, path: Path) -> dict[str, Any]:
        """A pretraining recipe tree (plain values) describing how the weights at `path` run: `tokenizer` (name,
        options), `model` (sizes, decoder included when stored), `masker`, `target`, `losses` and `data.train`
        (a dataset of the weights' modality whose options carry the input preprocessing, e.g. normalisation;
        its location options are placeholders). For tools that run weights without a recipe of the user's:
        `maeframe reconstruct` and `maeframe embed`. Default: refuses with a ValueError."""
        raise ValueError(f"weight format {type(self).__name__} cannot describe its weights as a recipe (it "
                         f"defines no recipe_for)")

    def read_autoencoder(self, path: Path, spec: TokenSpec, model: Any, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        """The weights as a whole masked autoencoder ({maeframe name: tensor}, `encoder.*` and `decoder.*`) for
        tools that reconstruct (`maeframe reconstruct`), the model running in `layout`; `model` is the recipe's
        `ModelConfig`. Default: `read`, keeping whatever decoder tensors it returns."""
        return self.read(path, spec, model, tokenizer_options)

    @abstractmethod
    def read(self, path: Path, spec: TokenSpec, model: Any, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        """The weights at `path` as {maeframe name: tensor} (keys outside `encoder.` are dropped), for the
        recipe's token grid `spec`, encoder sizes `model` (`EncoderConfig`) and tokenizer options. A file that
        does not fit is a `maeframe.interop.InteropError` naming the file, the tensor names and shapes."""
