"""The computation of the official MAE pretraining code (facebookresearch/mae, `models_mae.py` and the
per-iteration work of `engine_pretrain.py`), rebuilt on current timm for an in-process speed reference.

What the official code does, and this module does the same way:
* a stride-p convolution embeds all N patches, then random masking keeps `int(N * (1 - ratio))` of them
  (per-sample noise, `argsort`, `gather`); the decoder appends mask tokens and un-shuffles by `gather`;
* timm `Block`s with the attention written out (q @ kᵀ, softmax, @ v: timm 0.3.2, which the official
  code pins, has no fused attention), fixed 2-D sin-cos position tables, LayerNorm eps 1e-6;
* loss inside the model: mean squared error per patch on the (optionally normalised) pixels, averaged
  over masked patches;
* per iteration: forward under autocast, `loss.item()` (the official loop reads the loss every step and
  stops on a non-finite one), backward, the gradient norm from per-parameter norms (the official loss
  scaler computes it every step, clipping or not), `torch.optim.AdamW` (its default implementation: no
  `fused`) with no weight decay on biases and norms, `zero_grad`, `torch.cuda.synchronize()`.
Not reproduced: the official run's fp16 + GradScaler (the benchmark runs every implementation in the same
precision) and data loading.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maeframe.model.pos_embed import sincos_pos_embed


def explicit_attention_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
    for block in blocks:
        block.attn.fused_attn = False  # timm 0.3.2's attention: explicit matmuls and softmax
    return blocks


class OfficialMae(nn.Module):
    """imgs [B, C, H, W] -> (loss, pred [B, N, p*p*C], mask [B, N]) as the official MaskedAutoencoderViT,
    with the official parameter names (its checkpoints load with `load_state_dict`)."""

    def __init__(self, image_size: int, patch: int, channels: int, dim: int, depth: int, heads: int,
                 dec_dim: int, dec_depth: int, dec_heads: int, mlp_ratio: float, mask_ratio: float, norm_pix: bool):
        super().__init__()
        self.patch, self.mask_ratio, self.norm_pix = patch, mask_ratio, norm_pix
        grid = (image_size // patch,) * 2
        with_cls = lambda table: torch.cat([torch.zeros(1, table.shape[1]), table])[None]  # noqa: E731
        self.patch_embed = PatchEmbed(image_size, patch, channels, dim)  # a stride-p convolution, as the official
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", with_cls(sincos_pos_embed(grid, dim)))
        self.blocks = explicit_attention_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", with_cls(sincos_pos_embed(grid, dec_dim)))
        self.decoder_blocks = explicit_attention_blocks(dec_dim, dec_depth, dec_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * channels)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, N, p*p*C] in (row, column, channel) order."""
        b, c, h, w = imgs.shape
        p = self.patch
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def random_masking(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward(self, imgs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        hidden = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        y = torch.cat([x[:, 1:], hidden], dim=1)
        y = torch.gather(y, 1, ids_restore[..., None].expand(-1, -1, y.shape[2]))
        x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(imgs)
        if self.norm_pix:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms) and tokens, as the official optimizer setup."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def official_grad_norm(parameters: list[Tensor]) -> Tensor:
    """The official loss scaler's norm: the 2-norm of the per-parameter gradient 2-norms."""
    return torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in parameters if p.grad is not None]), 2.0)
