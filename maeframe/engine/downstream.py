"""What the downstream protocols (finetune, linprobe, knn) share: pretrained encoder weights, class names,
evaluation passes, and the `run_downstream` entry point that `maeframe run` calls for those tasks.

Encoder weights come from `init`:
    maeframe      a maeframe checkpoint (runs/NAME/last.pt of pretraining, or of a downstream run): its
                  "model" entry's `encoder.*` tensors;
    official_mae  reference MAE weights (`mae_pretrain_vit_base.pth`, ...), converted by maeframe.interop;
    none          random initialisation (the baseline).
Position embeddings are fixed sin-cos buffers rebuilt from the recipe's token grid, so an encoder
pretrained at one resolution loads at another with the same patch size.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..build import Prepared
from ..errors import MaeframeError
from ..interop.official_mae import InteropError, official_to_maeframe, read_official
from ..recipe import EncoderConfig, HeadConfig, InitConfig
from ..tokenizer import TokenSpec, Tokenizer
from .checkpoint import load_checkpoint

ARCHITECTURE = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def pretrained_encoder_state(init: InitConfig, spec: TokenSpec, model: EncoderConfig | None = None,
                             tokenizer_options: dict | None = None) -> dict[str, Tensor]:
    """The `encoder.*` tensors named by `init` (maeframe names and layout). With a maeframe checkpoint,
    its recorded encoder architecture and patch size must match `model` / `tokenizer_options`."""
    path = Path(init.checkpoint)
    if not path.is_file():
        hint = " (pretrain first, e.g. `maeframe run recipes/quickstart.yaml`)" if init.format == "maeframe" else ""
        raise FileNotFoundError(f"init.checkpoint {str(path)!r} does not exist{hint}")
    if init.format == "maeframe":
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            raise InteropError(f"init.checkpoint: {err}; for reference weights set init.format: official_mae") from None
        _check_recorded_architecture(state.get("recipe", {}), path, model, tokenizer_options)
        weights = state["model"]
    else:
        raw = read_official(path)
        # a reference fine-tuned checkpoint also holds its classifier: only the encoder is used
        raw = {k: v for k, v in raw.items() if not k.startswith(("head.", "fc_norm."))}
        rows = raw["pos_embed"].shape[1] - 1 if "pos_embed" in raw else None
        try:
            weights, _ = official_to_maeframe(raw, spec.grid if rows == math.prod(spec.grid) else None)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None
    return {k: v for k, v in weights.items() if k.startswith("encoder.")}


def _check_recorded_architecture(recipe: dict[str, Any], path: Path, model: EncoderConfig | None,
                                 tokenizer_options: dict | None) -> None:
    """num_heads is not visible in the weights' shapes, so compare with what the checkpoint's run recorded."""
    recorded = recipe.get("model", {})
    problems = [f"model.{key}: the checkpoint's encoder has {recorded[key]!r}, the recipe {getattr(model, key)!r}"
                for key in ARCHITECTURE if model is not None and key in recorded and recorded[key] != getattr(model, key)]
    theirs = recipe.get("tokenizer", {}).get("options", {})
    for key in ("patch_size", "channels"):
        if tokenizer_options and key in theirs and key in tokenizer_options and theirs[key] != tokenizer_options[key]:
            problems.append(f"tokenizer.options.{key}: the checkpoint was pretrained with {theirs[key]!r}, "
                            f"the recipe has {tokenizer_options[key]!r}")
    if problems:
        raise InteropError(f"{path}: " + "; ".join(problems))


def load_encoder(module: torch.nn.Module, weights: dict[str, Tensor], source: str) -> list[str]:
    """Copy `encoder.*` weights into `module` (which has an `encoder`); every encoder parameter must be
    covered with the right shape. Returns the checkpoint keys left unused (e.g. the final norm that
    average pooling replaces)."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith("encoder.")}
    missing = [k for k in own if k not in weights]
    mismatched = [f"{k}: checkpoint {list(weights[k].shape)} vs model {list(v.shape)}"
                  for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if missing or mismatched:
        detail = "; ".join(mismatched[:4]) + (f"; missing {missing[:6]}" if missing else "")
        raise InteropError(f"{source}: the encoder does not match the recipe's model/tokenizer "
                           f"(another size or patch size?): {detail}")
    module.load_state_dict({k: weights[k] for k in own}, strict=False)
    return [k for k in weights if k not in own]


def dataset_classes(head: HeadConfig | None, dataset: Dataset, labels: Tensor | None = None) -> list[str]:
    """Class names: the dataset's `classes`, else "0".."C-1" for head.num_classes or the labels seen."""
    names = getattr(dataset, "classes", None)
    count = head.num_classes if head is not None and head.num_classes else None
    if names is not None and (count is None or count == len(names)):
        return [str(n) for n in names]
    if count is None and labels is not None:
        count = int(labels.max()) + 1 if labels.dim() == 1 else labels.shape[1]
    if count is None:
        raise MaeframeError(f"head.num_classes: {type(dataset).__name__} has no `classes`; set the class count")
    return [str(i) for i in range(count)]


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Tokenizer, dataset: Dataset, device: torch.device,
            batch_size: int, autocast=None, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """(scores [N, C] float32 on CPU, labels) of `model` over `dataset` in order, in eval mode."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    # an explicit generator: creating the loader iterator must not consume the global RNG (exact resume)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    for batch, label in loader:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(tokenizer.tokenize(batch.to(device, non_blocking=True)).patches)
        scores.append(logits.float().cpu())
        labels.append(torch.as_tensor(label))
    model.train(was_training)
    return torch.cat(scores), torch.cat(labels)


def run_downstream(prepared: Prepared, resume: bool = False) -> dict[str, Any]:
    """Run a finetune / linprobe / knn recipe; returns the results also written to results.json."""
    task = prepared.recipe.task
    if task == "knn":
        from .knn_eval import run_knn

        if resume:
            raise MaeframeError("--resume: a knn run trains nothing; run it again under another name")
        return run_knn(prepared)
    if task == "finetune":
        from .finetune import FineTuner as Trainer
    elif task == "linprobe":
        from .linprobe import LinearProbe as Trainer
    else:
        raise MaeframeError(f"task {task!r} is not a downstream task")
    return Trainer(prepared, resume=resume).train()
