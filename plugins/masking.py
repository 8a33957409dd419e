"""Random masking: each sample hides exactly the same number of uniformly chosen tokens (MAE)."""
from __future__ import annotations

import torch
from pydantic import Field

from maeframe import Mask, Masker, Options, hookimpl, visible_count


class RandomOptions(Options):
    ratio: float = Field(0.75, ge=0, lt=1, description="fraction of tokens hidden from the encoder")


class RandomMasker(Masker):
    """Per sample, argsort of uniform noise; keeps int(N·(1-ratio)) tokens. Static shapes, no host sync."""

    Options = RandomOptions

    def visible_tokens(self) -> int:
        return visible_count(self.spec.num_tokens, self.options.ratio)

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        num_tokens = self.spec.num_tokens
        noise = torch.rand(batch_size, num_tokens, device=device)
        return Mask.from_noise(noise, visible_count(num_tokens, self.options.ratio))


@hookimpl
def register_maskers(register):
    register("random", RandomMasker)
