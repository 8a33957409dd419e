"""JointMaskedAutoencoder: one encoder and decoder shared by several modalities (OmniMAE, CAV-MAE).

Per modality: the patch embedding (or one shared by all, `model.shared_patch_embed`), fixed sin-cos positions of
its own grid, a modality-type embedding when the tokens of several modalities are concatenated (paired mixing),
the first `model.modality_blocks` encoder blocks, and the decoder's positions, type embedding and head. Shared:
the cls token, the other encoder blocks and the final norm, the decoder's projection, mask token, blocks and
norm. Built from the pieces of `vit.py` (`make_blocks`, `run_blocks`, `with_mask_tokens`, `LayerNorm`).

Parameter names: encoder.{cls_token, blocks.*, norm.*, patch_embed.* (shared)}, encoder.modalities.<m>.{patch_embed,
type_embed, blocks.*}, decoder.{embed, mask_token, blocks.*, norm.*}, decoder.modalities.<m>.{type_embed, head}.
`encoder_state` maps them onto a single-modality `Encoder` of depth `model.depth` for downstream use.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..loss import Prediction
from ..masker import Mask
from ..recipe import ModelConfig
from ..tokenizer import TokenSpec
from .mae import init_mae_weights
from .pos_embed import sincos_pos_embed
from .vit import LayerNorm, gather_tokens, make_blocks, run_blocks, with_mask_tokens


class ModalityStem(nn.Module):
    """A modality's front of the encoder: its patch embedding (absent when shared), positions of its grid, its
    type embedding (paired mixing) and its own first blocks."""

    def __init__(self, spec: TokenSpec, dim: int, blocks: nn.Sequential, own_patch_embed: bool, typed: bool):
        super().__init__()
        self.patch_embed = nn.Linear(spec.patch_dim, dim) if own_patch_embed else None  # None: the shared one
        self.register_buffer("pos_embed", sincos_pos_embed(spec.grid, dim)[None], persistent=False)
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim)) if typed else None
        self.blocks = blocks

    def embed(self, patch_embed: nn.Linear, patches: Tensor, ids_keep: Tensor) -> Tensor:
        """patches [B, N, patch_dim], ids_keep [B, V] -> [B, V, D]: embedded visible tokens + positions (+ type)."""
        pos = gather_tokens(self.pos_embed.expand(patches.shape[0], -1, -1), ids_keep)
        x = patch_embed(gather_tokens(patches, ids_keep)) + pos
        return x + self.type_embed if self.type_embed is not None else x


class JointEncoder(nn.Module):
    def __init__(self, specs: dict[str, TokenSpec], config: ModelConfig, typed: bool):
        super().__init__()
        d, k = config.embed_dim, config.modality_blocks
        self.recompute, self.pooled = config.activation_checkpointing, config.pooled_latent
        self.embed_dim = d
        self.patch_embed = nn.Linear(next(iter(specs.values())).patch_dim, d) if config.shared_patch_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))

        def blocks() -> list[nn.Module]:  # stochastic depth rises over all `depth` blocks, as in one encoder
            return list(make_blocks(d, config.depth, config.num_heads, config.mlp_ratio, config.drop_path))

        self.modalities = nn.ModuleDict({
            name: ModalityStem(spec, d, nn.Sequential(*blocks()[:k]), not config.shared_patch_embed, typed)
            for name, spec in specs.items()})
        self.blocks = nn.Sequential(*blocks()[k:])
        self.norm = LayerNorm(d)

    def forward(self, patches: dict[str, Tensor], masks: dict[str, Mask]) -> tuple[Tensor, dict[str, Tensor]]:
        """patches {m: [B, N_m, patch_dim_m]}, masks {m: Mask} (the modalities of this batch, any subset) ->
        (latent [B, 1 + ΣV_m, D]: cls, then each modality's visible tokens in the order of `patches`,
        {m: pooled [B, D]} as `model.pooled_latent` says, else {})."""
        parts = []
        for name, x in patches.items():
            stem = self.modalities[name]
            x = stem.embed(stem.patch_embed if stem.patch_embed is not None else self.patch_embed, x,
                           masks[name].ids_keep)
            parts.append(run_blocks(stem.blocks, x, self.recompute) if len(stem.blocks) else x)
        cls = self.cls_token.expand(parts[0].shape[0], -1, -1)
        latent = self.norm(run_blocks(self.blocks, torch.cat([cls, *parts], dim=1), self.recompute))
        pooled = {}
        if self.pooled == "joint":
            start = 1
            for name, part in zip(patches, parts):
                pooled[name] = latent[:, start:start + part.shape[1]].mean(1)
                start += part.shape[1]
        elif self.pooled == "separate":
            for name, part in zip(patches, parts):
                pooled[name] = self.norm(run_blocks(self.blocks, part, self.recompute)).mean(1)
        return latent, pooled


class ModalityEncoder(nn.Module):
    """One modality's view of a `JointEncoder` as a single-modality encoder: (patches [B, N, patch_dim], ids_keep
    [B, V] or None = all tokens) -> latent [B, 1 + V, D] (the online k-NN monitor encodes with it)."""

    def __init__(self, joint: JointEncoder, modality: str):
        super().__init__()
        self.joint, self.modality = joint, modality

    @property
    def cls_token(self) -> Tensor:
        """The shared cls token, first in every latent (feature pooling skips it)."""
        return self.joint.cls_token

    def forward(self, patches: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        if ids_keep is None:
            ids_keep = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[0], -1)
        mask = Mask(ids_keep, ids_keep, torch.zeros(patches.shape[:2], device=patches.device))  # all visible
        return self.joint({self.modality: patches}, {self.modality: mask})[0]


class JointDecoder(nn.Module):
    def __init__(self, specs: dict[str, TokenSpec], out_dims: dict[str, int], config: ModelConfig, typed: bool):
        super().__init__()
        d = config.decoder_embed_dim
        self.recompute = config.activation_checkpointing
        self.embed = nn.Linear(config.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.modalities = nn.ModuleDict({name: DecoderHead(spec, d, out_dims[name], typed) for name, spec in specs.items()})
        self.blocks = make_blocks(d, config.decoder_depth, config.decoder_num_heads, config.mlp_ratio)
        self.norm = LayerNorm(d)

    def forward(self, latent: Tensor, masks: dict[str, Mask]) -> dict[str, Tensor]:
        """latent [B, 1 + ΣV_m, D_enc] (as `JointEncoder` returns it), masks {m: Mask} in the latent's order ->
        {m: predictions [B, N_m, out_dim_m]}: every modality's tokens decoded together (a joint decoder)."""
        x = self.embed(latent)
        parts, start = [], 1
        for name, mask in masks.items():
            visible = x[:, start:start + mask.num_visible]
            start += mask.num_visible
            head = self.modalities[name]
            y = with_mask_tokens(visible, self.mask_token, mask.ids_restore) + head.pos_embed
            parts.append(y + head.type_embed if head.type_embed is not None else y)
        x = self.norm(run_blocks(self.blocks, torch.cat([x[:, :1], *parts], dim=1), self.recompute))
        out, start = {}, 1
        for name, part in zip(masks, parts):
            out[name] = self.modalities[name].head(x[:, start:start + part.shape[1]])
            start += part.shape[1]
        return out


class DecoderHead(nn.Module):
    """A modality's part of the decoder: positions of its grid, its type embedding (paired mixing), its head."""

    def __init__(self, spec: TokenSpec, dim: int, out_dim: int, typed: bool):
        super().__init__()
        self.register_buffer("pos_embed", sincos_pos_embed(spec.grid, dim)[None], persistent=False)
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim)) if typed else None
        self.head = nn.Linear(dim, out_dim)


class JointMaskedAutoencoder(nn.Module):
    """Built from each modality's `TokenSpec` and target size. `typed`: add modality-type embeddings (paired
    mixing, where the tokens of several modalities share one sequence)."""

    def __init__(self, specs: dict[str, TokenSpec], out_dims: dict[str, int], config: ModelConfig, typed: bool):
        super().__init__()
        self.specs = dict(specs)
        self.encoder = JointEncoder(specs, config, typed)
        self.decoder = JointDecoder(specs, out_dims, config, typed)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation (as `MaskedAutoencoder`), plus N(0, 0.02) type embeddings."""
        init_mae_weights(self)
        for name, param in self.named_parameters():
            if name.endswith("type_embed"):
                nn.init.normal_(param, std=0.02)

    def forward(self, patches: dict[str, Tensor], masks: dict[str, Mask]) -> dict[str, Prediction]:
        """patches {m: [B, N_m, patch_dim_m]}, masks {m: Mask} for the modalities of this batch (one under
        alternate mixing, all under paired) -> {m: Prediction(values [B, N_m, out_dim_m], latent [B, 1 + V_m, D]
        (the cls token and m's visible tokens), pooled [B, D] or None)}."""
        latent, pooled = self.encoder(patches, masks)
        ordered = {name: masks[name] for name in patches}
        values = self.decoder(latent, ordered)
        out, start = {}, 1
        for name, mask in ordered.items():
            own = torch.cat([latent[:, :1], latent[:, start:start + mask.num_visible]], dim=1)
            start += mask.num_visible
            out[name] = Prediction(values[name], own, pooled=pooled.get(name))
        return out

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "decoder.mask_token",
                *(name for name, _ in self.named_parameters() if name.endswith("type_embed"))}
