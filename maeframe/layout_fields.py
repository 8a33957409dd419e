"""The `model` recipe fields that choose the token layout of encoder and decoder (mixed into
`maeframe.recipe.ModelConfig`; `maeframe.model.recipe_layout` turns them into an `EncoderLayout`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class LayoutFields(BaseModel):
    cls_token: bool = Field(True, description="a learned cls token before the patch tokens (false: the encoder sees "
                                              "the patch tokens only, downstream features are their mean; "
                                              "VideoMAE's layout; needs decoder_attention: global)")
    positions: Literal["axes", "flat"] = Field(
        "axes", description="fixed positions of encoder and decoder: axes (sin-cos per token grid axis, MAE) or "
                            "flat (one sinusoid table over the flattened token order, VideoMAE)")
    decoder_embed_bias: bool = Field(True, description="a bias in the encoder-to-decoder projection (false: "
                                                       "VideoMAE's encoder_to_decoder, which has none)")
