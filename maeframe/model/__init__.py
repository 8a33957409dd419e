from .mae import MaskedAutoencoder
from .pos_embed import sincos_pos_embed
from .vit import Decoder, Encoder

__all__ = ["MaskedAutoencoder", "Encoder", "Decoder", "sincos_pos_embed"]
