"""AdamW with MAE's parameter groups and lr scaling; per-iteration warmup + cosine from timm."""
from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..recipe import OptimConfig


def peak_lr(config: OptimConfig, effective_batch: int) -> float:
    """The absolute lr if given, else base_lr × effective_batch / 256 (the MAE scaling rule)."""
    return config.lr if config.lr is not None else config.base_lr * effective_batch / 256


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """No weight decay on 1-D parameters (norms, biases) nor on the model's `no_weight_decay()` names
    (cls and mask tokens; position embeddings are fixed buffers and never trained). The fused kernel
    (CPU and CUDA) takes a device-side `found_inf` flag, which lets a non-finite step be skipped
    without a host sync."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, fused=True)


def build_schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup from 0 over `warmup_epochs`, then half-cosine to `min_lr`, updated every step.
    Call `schedule.step_update(step)` before each optimizer step."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=config.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
