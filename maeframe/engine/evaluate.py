"""Held-out evaluation of a trained masked autoencoder, identical for every variant of a comparison.

Every number is computed under one FIXED evaluation mask: random masking at `eval_ratio` drawn from a
dedicated `torch.Generator` seeded with `seed` (never the recipe's masker, so a curriculum or a structured
masker is evaluated exactly like plain random masking, and never the global RNG).

Metrics (all over the first `limit` images of the eval dataset, display space = [0, 1] after
`dataset.denormalize`; "hidden pixels" = the pixels of the tokens the mask hides):

masked_psnr   per image 10·log10(1 / MSE) with MSE over its hidden pixels only, then averaged over images.
              The reconstruction is `target.reconstruct(prediction)` (for `pixel` with norm_pix this
              re-applies each hidden patch's TRUE mean and std, as MAE's demo does, so the number measures
              structure inside patches rather than the patch brightness). A perfect reconstruction
              (MSE = 0) is capped at PSNR_CAP_DB = 100 dB so averages stay finite. Skipped (None, "n/a"
              in reports) when the target is not in pixel space (`Target.reconstructs_pixels`): an edge
              or feature target's prediction is no picture of the input.
hf_error      mean over hidden pixels (and channels) of |L(pasted) − L(original)|, L = the 3×3 Laplacian
              [[0,1,0],[1,-4,1],[0,1,0]] with replicate padding, applied per channel to display-space
              images; `pasted` is the original with its hidden patches replaced by the reconstruction
              (what a viewer sees), so seams at patch borders count too. 0 for a perfect or a
              constant-and-correct reconstruction; larger when detail is blurred away or invented.
knn_top1      weighted kNN (cosine, k=20, T=0.07) top-1 accuracy of mean-pooled encoder features with
              all tokens visible: bank = the first `knn_train_limit` images of the TRAIN split without
              augmentation (the train dataset class built with train=False), queries = the eval images.
              Skipped (None) when the datasets carry no labels (labels < 0).
eval_loss/*   each recipe loss term on the eval images under the fixed mask (mean over batches weighted by
              their size; a batch on which a term raises ValueError, e.g. a batch-statistics term on a last
              batch of one image, is left out of that term), and their weighted sum `eval_loss/total`.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..build import Prepared, build_dataset
from ..dataset import Dataset
from ..masker import Mask, visible_count
from ..tokenizer import Tokenizer, TokenSpec
from .knn import encode_dataset, knn_accuracy

PSNR_CAP_DB = 100.0  # PSNR of an exact reconstruction (MSE 0), so that averages stay finite
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
EVAL_RATIO = 0.75
EVAL_SEED = 0


# --- the pieces, usable on their own ------------------------------------------------------------------

def fixed_mask(count: int, spec: TokenSpec, ratio: float = EVAL_RATIO, seed: int = EVAL_SEED) -> Mask:
    """The evaluation mask of the first `count` images (on CPU): row i depends only on (seed, i, ratio),
    not on the batch size or on any global RNG."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, spec.num_tokens, generator=generator)
    return Mask.from_noise(noise, visible_count(spec.num_tokens, ratio))


def mask_rows(mask: Mask, start: int, stop: int, device: torch.device) -> Mask:
    return Mask(mask.ids_keep[start:stop].to(device), mask.ids_restore[start:stop].to(device),
                mask.masked[start:stop].to(device))


def hidden_pixels(tokenizer: Tokenizer, mask: Mask) -> Tensor:
    """[B, *input_shape] float: 1.0 on every input element of a hidden token."""
    patch_dim = tokenizer.spec.patch_dim
    return tokenizer.untokenize(mask.masked.unsqueeze(-1).expand(-1, -1, patch_dim).contiguous())


def psnr_per_image(reconstruction: Tensor, original: Tensor, weight: Tensor, peak: float = 1.0) -> Tensor:
    """[B] PSNR in dB of the MSE over the pixels where weight is 1; capped at PSNR_CAP_DB."""
    dims = tuple(range(1, original.dim()))
    mse = ((reconstruction.float() - original.float()).pow(2) * weight).sum(dims) / weight.sum(dims).clamp_min(1)
    psnr = 10 * torch.log10(peak**2 / mse.clamp_min(peak**2 * 10 ** (-PSNR_CAP_DB / 10)))
    return psnr.clamp(max=PSNR_CAP_DB)


def laplacian(images: Tensor) -> Tensor:
    """3×3 Laplacian per channel with replicate padding: [B, C, H, W] -> [B, C, H, W]."""
    channels = images.shape[1]
    kernel = LAPLACIAN.to(images.device, images.dtype).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


def hf_error_sum(reconstruction: Tensor, original: Tensor, weight: Tensor) -> tuple[float, float]:
    """(sum over weighted pixels of |L(reconstruction) − L(original)|, number of weighted pixels)."""
    diff = (laplacian(reconstruction.float()) - laplacian(original.float())).abs()
    return float((diff * weight).sum()), float(weight.sum())


def train_dataset_without_augmentation(prepared: Prepared) -> Dataset:
    """The recipe's TRAIN dataset (data.train, with its options, e.g. its limit) built with train=False:
    the deterministic evaluation transform, no augmentation."""
    ref = prepared.recipe.data.train
    entry = prepared.registry.get("dataset", ref.name)
    return entry.cls(entry.cls.Options.model_validate(ref.options), prepared.components.tokenizer.input_shape,
                     False)


def _labels_exist(dataset) -> bool:
    try:
        label = dataset[0][1]
        return int(label) >= 0
    except (TypeError, ValueError, IndexError):
        return False


def _first(dataset, limit: int | None):
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


# --- the evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: Prepared, device: torch.device | str = "cpu", *,
             eval_ratio: float = EVAL_RATIO, seed: int = EVAL_SEED, limit: int | None = 10000,
             knn_train_limit: int | None = 10000, batch_size: int = 256, knn: bool = True,
             autocast=contextlib.nullcontext, panel_path=None, panel_samples: int = 8) -> dict[str, Any]:
    """Evaluate `model` (a MaskedAutoencoder) with the prepared recipe's components on its eval dataset
    (`data.eval`, else the train data without augmentation). Returns a dict of plain numbers (see the
    module docstring); None marks a metric that does not apply. `panel_path`: also save reconstruction
    panels of the first `panel_samples` eval images under the fixed mask there."""
    device = torch.device(device)
    components = prepared.components
    tokenizer, target = components.tokenizer, components.target
    started = time.perf_counter()
    dataset = build_dataset(prepared, "eval")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    mask = fixed_mask(count, tokenizer.spec, eval_ratio, seed)
    was_training = model.training
    model.eval()

    psnr_sum, psnr_images, hf_sum, hf_pixels = 0.0, 0, 0.0, 0.0
    loss_sums: dict[str, tuple[float, int]] = {}
    pixels = target.reconstructs_pixels  # pixel metrics only for a target in pixel space
    start = 0
    for batch, _ in DataLoader(_first(dataset, count), batch_size=batch_size):
        stop = start + len(batch)
        batch = batch.to(device)
        rows = mask_rows(mask, start, stop, device)
        tokens = tokenizer.tokenize(batch)
        with autocast():
            target_out = target(tokens, rows)
            prediction = model(tokens.patches, rows)
        terms: dict[str, float] = {}
        for name, _, loss in components.losses:
            try:
                terms[name] = float(loss(prediction, target_out, rows))
            except ValueError:  # e.g. a batch-statistics term on a last batch of one image: leave it out
                continue
        if len(terms) == len(components.losses):
            terms["total"] = sum(weight * terms[name] for name, weight, _ in components.losses)
        for name, value in terms.items():
            total, images = loss_sums.get(name, (0.0, 0))
            loss_sums[name] = (total + value * len(batch), images + len(batch))
        recon = target.reconstruct(prediction.values.float(), tokens) if pixels else None
        if recon is None:
            pixels = False
        else:
            original = dataset.denormalize(tokens.source.float())
            reconstruction = dataset.denormalize(tokenizer.untokenize(recon))
            hidden = hidden_pixels(tokenizer, rows)
            pasted = original * (1 - hidden) + reconstruction * hidden
            psnr_sum += float(psnr_per_image(reconstruction, original, hidden).sum())
            psnr_images += len(batch)
            if original.dim() == 4:  # the Laplacian of [B, C, H, W] images
                hf, counted = hf_error_sum(pasted, original, hidden)
                hf_sum, hf_pixels = hf_sum + hf, hf_pixels + counted
            if panel_path is not None and start == 0:
                shown = min(panel_samples, len(batch))
                grey = original * (1 - hidden) + 0.5 * hidden
                panels = torch.stack([original, grey, reconstruction, pasted], dim=1)[:shown].clamp(0, 1).cpu()
                on_cpu = Mask(*(t[:shown].cpu() for t in (rows.ids_keep, rows.ids_restore, rows.masked)))
                tokenizer.save_pictures(panels, Path(panel_path), on_cpu)
        start = stop

    result: dict[str, Any] = {
        "eval_images": count, "eval_ratio": eval_ratio, "eval_seed": seed,
        "masked_psnr": psnr_sum / psnr_images if pixels and psnr_images else None,
        "hf_error": hf_sum / hf_pixels if pixels and hf_pixels else None,
        **{f"eval_loss/{name}": total / images for name, (total, images) in loss_sums.items()},
        "knn_top1": None, "knn_train_images": 0,
    }
    if knn and _labels_exist(dataset):
        bank_dataset = _first(train_dataset_without_augmentation(prepared), knn_train_limit)
        if _labels_exist(bank_dataset):
            with autocast():
                bank, bank_labels = encode_dataset(model.encoder, tokenizer, bank_dataset, device, batch_size)
                queries, query_labels = encode_dataset(model.encoder, tokenizer, _first(dataset, count), device,
                                                       batch_size)
            result["knn_top1"] = knn_accuracy(bank, bank_labels, queries, query_labels)
            result["knn_train_images"] = len(bank_dataset)
    model.train(was_training)
    result["eval_seconds"] = round(time.perf_counter() - started, 2)
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            result[key] = None if math.isnan(value) else value
    return result


def evaluate_pretrainer(trainer, **kwargs) -> dict[str, Any]:
    """`evaluate` for a (trained) `Pretrainer`: its model, prepared recipe, device and autocast."""
    return evaluate(trainer.model, trainer.prepared, trainer.device, autocast=trainer.runtime.autocast, **kwargs)
