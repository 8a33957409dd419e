from .mae import MaskedAutoencoder, recipe_layout
from .pos_embed import flat_sincos_pos_embed, sincos_pos_embed
from .vit import Decoder, Encoder

__all__ = ["MaskedAutoencoder", "Encoder", "Decoder", "recipe_layout", "sincos_pos_embed", "flat_sincos_pos_embed"]
