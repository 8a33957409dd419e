"""A third modality added by a plugin alone (tests/test_joint.py): 1-D signals with their own tokenizer and
datasets, a paired image + signal dataset and a cross-modal loss. Loaded by recipes through `plugins:`."""
from __future__ import annotations

import math

import torch
from pydantic import Field

from maeframe import CrossModalLoss, Dataset, Options, Tokenizer, Tokens, TokenSpec, hookimpl


class SignalOptions(Options):
    length: int = Field(32, gt=0, description="samples per signal")
    patch: int = Field(4, gt=0, description="samples per token")


class SignalTokenizer(Tokenizer):
    """[B, 1, L] <-> [B, L / p, p] on a 1-D grid."""

    Options = SignalOptions

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec(grid=(self.options.length // self.options.patch,), patch_size=(self.options.patch,),
                         channels=1)

    @property
    def input_shape(self) -> tuple[int, int]:
        return (1, self.options.length)

    def tokenize(self, batch):
        return Tokens(batch.reshape(batch.shape[0], -1, self.options.patch), batch)

    def untokenize(self, patches):
        return patches.reshape(patches.shape[0], 1, -1)


class WavesOptions(Options):
    count: int = Field(48, gt=0, description="signals")


def wave(length: int, label: int) -> torch.Tensor:
    """A sine of frequency label + 1 at a random phase (torch's seeded generator), [length]."""
    t = torch.arange(length) / length
    return torch.sin(2 * math.pi * (label + 1) * t + torch.rand(()) * 6.28)


class Waves(Dataset):
    """Sine waves, 3 classes by frequency."""

    Options = WavesOptions
    classes = ["1", "2", "3"]

    def __len__(self) -> int:
        return self.options.count

    def __getitem__(self, index):
        return wave(self.input_shape[1], index % 3)[None], index % 3


class StripesAndWaves(Dataset):
    """Paired: an image of vertical stripes and a signal of the same frequency (3 classes)."""

    Options = WavesOptions
    paired = True

    def __len__(self) -> int:
        return self.options.count

    def __getitem__(self, index):
        label = index % 3
        c, h, w = self.input_shape["image"]
        stripes = wave(w, label).expand(c, h, w).clone()
        return {"image": stripes, "signal": wave(self.input_shape["signal"][1], label)[None]}, label


class PooledAgreement(CrossModalLoss):
    """1 - mean cosine similarity of the two modalities' pooled latents."""

    def __call__(self, predictions, masks):
        image, signal = predictions["image"].pooled, predictions["signal"].pooled
        if image is None or signal is None:
            raise ValueError("pooled_agreement needs model.pooled_latent")
        return 1 - torch.nn.functional.cosine_similarity(image.float(), signal.float()).mean()


@hookimpl
def register_tokenizers(register):
    register("toy_signal", SignalTokenizer)


@hookimpl
def register_datasets(register):
    register("toy_waves", Waves)
    register("toy_stripes_and_waves", StripesAndWaves)


@hookimpl
def register_losses(register):
    register("toy_pooled_agreement", PooledAgreement)
