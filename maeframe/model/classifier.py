"""The classifier evaluated downstream: maeframe's ViT encoder, a pooling, and a linear head.

Names follow the pretraining model, so a checkpoint's `encoder.*` weights load as they are:
    encoder.patch_embed, encoder.cls_token, encoder.blocks.{i}, encoder.norm   (the ViT)
    fc_norm                                                                 (LayerNorm after avg pooling)
    head                                                                    (Linear, or BatchNorm1d + Linear)

pool="avg" follows MAE fine-tuning: the encoder's final norm is dropped, the patch tokens are averaged and
normalised by a new LayerNorm (`fc_norm`). pool="cls" keeps the final norm and takes the cls token.
Position embeddings are fixed sin-cos buffers of the token grid, so another resolution is just another grid.
`layout` (an `EncoderLayout` of the weights' format) can drop the cls token — every token is encoded, pool
must be "avg" — and replace the per-axis sin-cos positions by the format's own table (e.g. official VideoMAE
weights: no cls token, a 1-D sinusoid over the token index).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

from ..errors import MaeframeError
from .vit import Encoder, LayerNorm
from ..recipe import EncoderConfig
from ..tokenizer import TokenSpec
from ..weights import EncoderLayout


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay (as BEiT/MAE): patch embedding, cls token and position
    embedding -> 0, block i -> i + 1, everything after the blocks (final norm, fc_norm, head) -> depth + 1."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch: under torchrun the per-feature
    sums, sums of squares and the sample count are all-reduced (differentiably), so N processes normalise
    exactly as one process with the N× batch (torch's SyncBatchNorm does the same, on GPUs only). One process
    uses the same formula. Evaluation uses the running statistics, as BatchNorm1d."""

    def forward(self, x: Tensor) -> Tensor:
        """x [B, D] -> normalised [B, D] (float32)."""
        if not self.training:
            return super().forward(x)
        x = x.float()
        moments = torch.cat([x.sum(0), x.pow(2).sum(0), x.new_full((1,), x.shape[0])])
        if dist.is_initialized() and dist.get_world_size() > 1:
            moments = all_reduce(moments)
        width = x.shape[1]
        count = moments[-1]
        mean = moments[:width] / count
        var = (moments[width:2 * width] / count - mean.pow(2)).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), self.momentum)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


class Classifier(nn.Module):
    """patches [B, N, patch_dim] -> logits [B, num_classes].

    features="pixels" replaces the encoder by the flat patches (the raw-pixel baseline of k-NN and linear
    probing); `bn_head` puts a BatchNorm1d(affine=False) over the global batch before the linear layer (MAE's
    linear probe).
    """

    def __init__(self, spec: TokenSpec, config: EncoderConfig, num_classes: int, pool: str = "avg",
                 bn_head: bool = False, features: str = "encoder", layout: EncoderLayout = EncoderLayout()):
        super().__init__()
        if not layout.cls_token and (pool != "avg" or features != "encoder"):
            raise MaeframeError("head.pool: the encoder these weights need has no cls token (init.format); use "
                                "pool: avg")
        self.pool, self.features, self.depth, self.layout = pool, features, config.depth, layout
        self.encoder_frozen = False
        if features == "pixels":
            self.encoder = None
            width = spec.num_tokens * spec.patch_dim
            self.fc_norm: nn.Module = nn.Identity()
        else:
            self.encoder = Encoder(spec.grid, spec.patch_dim, config.embed_dim, config.depth, config.num_heads,
                                   config.mlp_ratio, config.drop_path, layout=layout)
            width = config.embed_dim
            if pool == "avg":
                self.encoder.norm = nn.Identity()
                self.fc_norm = LayerNorm(width)
            else:
                self.fc_norm = nn.Identity()
        linear = nn.Linear(width, num_classes)
        self.head = nn.Sequential(GlobalBatchNorm1d(width, affine=False, eps=1e-6), linear) if bn_head else linear
        self.num_classes = num_classes

    @property
    def linear(self) -> nn.Linear:
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head

    def reset_parameters(self, head_std: float) -> None:
        """Encoder as MAE pretraining initialises it (xavier-uniform Linears, zero biases, unit norms,
        N(0, 0.02) cls token); the head's weight trunc-normal(head_std) with a zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.encoder is not None and self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=head_std)
        nn.init.zeros_(self.linear.bias)

    def freeze_encoder(self) -> None:
        """Linear probing: encoder (and fc_norm) weights fixed and always in eval mode; only the head trains."""
        self.encoder_frozen = True
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("head.")
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.encoder_frozen:
            for module in (self.encoder, self.fc_norm):
                if module is not None:
                    module.eval()
        return self

    def forward_features(self, patches: Tensor) -> Tensor:
        """patches [B, N, patch_dim] -> pooled features [B, width]."""
        if self.encoder is None:
            return patches.flatten(1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            if not self.layout.cls_token:                # every token, no cls token (e.g. VideoMAE's forward)
                encoder = self.encoder
                tokens = encoder.norm(encoder.blocks(encoder.patch_embed(patches) + encoder.pos_embed))
                return self.fc_norm(tokens.mean(1))
            latent = self.encoder(patches)
            pooled = latent[:, 1:].mean(1) if self.pool == "avg" else latent[:, 0]
            return self.fc_norm(pooled)

    def forward(self, patches: Tensor) -> Tensor:
        return self.head(self.forward_features(patches))

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's hook for `param_groups_layer_decay`: parameter name -> layer id."""
        return lambda name: layer_id(name, self.depth)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token"}


class TokenizedClassifier(nn.Module):
    """A tokenizer in front of a `Classifier`: inputs [B, *input_shape] (e.g. normalised images) -> logits.
    The form that is exported (TorchScript, ONNX)."""

    def __init__(self, tokenizer, classifier: Classifier):
        super().__init__()
        self.tokenizer = tokenizer
        self.classifier = classifier

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(self.tokenizer.tokenize(inputs).patches)
