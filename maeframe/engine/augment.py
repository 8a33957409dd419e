"""Batch mixing of fine-tuning (`BatchMixup`: timm's mixup/cutmix for inputs of any rank and for multi-hot
targets), the same for every modality. Per-sample augmentation (RandAugment, erasing, SpecAugment) belongs to
the dataset plugins (`maeframe.Dataset.use_finetune_augment`)."""
from __future__ import annotations

from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
from torch import Tensor

from ..seeding import python_numpy_seeded


class BatchMixup(Mixup):
    """timm's `Mixup` (mode "batch") for inputs [B, C, *, H, W] of rank >= 4 and multi-hot targets, with its
    draws and its pairing independent of how the global batch is split over processes.

    One lam, one choice of mixup or cutmix and one box per global micro-batch, drawn with timm's
    distributions from `seed` alone (the engine passes (seed, step, micro-batch)); each sample is mixed with
    its `partner` row (the engine passes its partner in the reversed global batch, which is timm's `flip(0)`
    in one process). A CutMix box spans (H, W): one box pasted on every frame of a clip [B, C, T, H, W], as
    VideoMAE. Targets: smoothed one-hot (or multi-hot: y(1-s) + s/2), mixed with the partner's by lam."""

    def __call__(self, x: Tensor, target: Tensor, seed: int,
                 partner: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        partner_x, partner_target = partner if partner is not None else (x.flip(0), target.flip(0))
        with python_numpy_seeded(seed):
            lam, use_cutmix = self._params_per_batch()
            if use_cutmix and lam != 1.0:
                (top, bottom, left, right), lam = cutmix_bbox_and_lam(x.shape, lam, self.cutmix_minmax,
                                                                      self.correct_lam)
        if lam != 1.0 and use_cutmix:
            x = x.clone()
            x[..., top:bottom, left:right] = partner_x[..., top:bottom, left:right]
        elif lam != 1.0:
            x = x * lam + partner_x * (1.0 - lam)
        smooth = lambda t: mixup_target(t, self.num_classes, 1.0, self.label_smoothing, self.multi_label)  # noqa: E731
        return x, smooth(target) * lam + smooth(partner_target) * (1.0 - lam)
