"""Linear probing (MAE's protocol): the pretrained encoder frozen (no gradients, always in eval mode), the
cls token (or avg pooling) fed through BatchNorm1d(affine=False) into a linear layer, trained with LARS at
lr = base_lr (0.1) × effective batch / 256, no weight decay, warmup + cosine. The data pipeline is the
dataset's own training augmentation (RandomResizedCrop + flip): no RandAugment, mixup or erasing. Under
torchrun the BatchNorm normalises with the statistics of the global batch (`GlobalBatchNorm1d`), so N
processes train the head exactly as one process with the N× batch.
"""
from __future__ import annotations

import torch
from timm.optim import Lars
from torch import nn

from .downstream import train_set_without_device_transform
from .finetune import FineTuner
from ..model.classifier import Classifier


def build_lars(model: nn.Module, weight_decay: float, momentum: float, lr: float) -> Lars:
    """LARS over the trainable parameters. As in MAE, weight matrices get the trust-ratio adaptation (and
    the weight decay); biases and other 1-D parameters are plain momentum SGD without decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=0.001)


class LinearProbe(FineTuner):
    """A `task: linprobe` run: `FineTuner`'s evaluation, resume and results with a frozen encoder and LARS."""

    bn_head = True
    default_head_std = 0.01

    def build_train_set(self):
        return train_set_without_device_transform(self.prepared)

    def build_model(self) -> Classifier:
        model = super().build_model()
        model.freeze_encoder()
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optim = self.recipe.optim
        return build_lars(model, optim.weight_decay, optim.momentum, self.lr)

    def build_criterion(self):
        return None, nn.BCEWithLogitsLoss() if self.multi_label else nn.CrossEntropyLoss()
