"""MaskedAutoencoder: encoder over visible tokens, decoder over all positions. No loss inside."""
from __future__ import annotations

from torch import Tensor, nn

from ..loss import Prediction
from ..masker import Mask
from ..recipe import ModelConfig
from ..tokenizer import TokenSpec
from ..weights import EncoderLayout
from .pos_embed import flat_sincos_pos_embed
from .vit import Decoder, Encoder


def recipe_layout(model: ModelConfig | dict) -> EncoderLayout:
    """The layout a pretraining recipe's `model` (a ModelConfig, or the plain tree a checkpoint recorded, whose
    absent fields take their defaults) asks for: its cls_token, and positions "flat" as the sinusoid table over
    the flattened token order."""
    config = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
    return EncoderLayout(cls_token=config.cls_token,
                         positions=flat_sincos_pos_embed if config.positions == "flat" else None)


class MaskedAutoencoder(nn.Module):
    """Built from the tokenizer's `TokenSpec` and the target's output size. `layout`: the recipe's own
    (`recipe_layout`: `model.cls_token`, `model.positions`), or how another project's weights run (a
    `WeightFormat.layout`, e.g. VideoMAE's: no cls token, its own position table in the encoder and the
    decoder); the default is maeframe's (cls token, per-axis sin-cos)."""

    def __init__(self, spec: TokenSpec, out_dim: int, config: ModelConfig, layout: EncoderLayout = EncoderLayout()):
        super().__init__()
        self.spec, self.layout = spec, layout
        self.encoder = Encoder(spec.grid, spec.patch_dim, config.embed_dim, config.depth, config.num_heads,
                               config.mlp_ratio, config.drop_path, config.activation_checkpointing, layout)
        self.decoder = Decoder(spec.grid, config.embed_dim, out_dim, config.decoder_embed_dim,
                               config.decoder_depth, config.decoder_num_heads, config.mlp_ratio,
                               config.decoder_window if config.decoder_attention == "local" else None,
                               config.decoder_window_shift, config.activation_checkpointing, layout,
                               config.decoder_window_block, config.decoder_embed_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_mae_weights(self)

    def forward(self, patches: Tensor, mask: Mask) -> Prediction:
        """patches [B, N, patch_dim] -> Prediction(values [B, N, out_dim], latent [B, 1 + V, D]; [B, V, D]
        without a cls token)."""
        latent = self.encoder(patches, mask.ids_keep)
        return Prediction(self.decoder(latent, mask.ids_restore), latent, has_cls=self.layout.cls_token)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "decoder.mask_token"}


def init_mae_weights(model: nn.Module) -> None:
    """MAE initialisation of a model with `encoder.cls_token` (or None) and `decoder.mask_token`: xavier-uniform
    Linear weights (the patch embedding seen as a matrix), zero biases, unit LayerNorms, N(0, 0.02) cls and
    mask tokens."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if model.encoder.cls_token is not None:
        nn.init.normal_(model.encoder.cls_token, std=0.02)
    nn.init.normal_(model.decoder.mask_token, std=0.02)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

