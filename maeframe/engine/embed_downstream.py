"""Features of a fine-tuned or linearly probed maeframe checkpoint for `maeframe embed`: the classifier the run
trained, rebuilt from its recorded recipe and loaded whole, and what its head sees (`Classifier.forward_features`:
fc_norm of the mean of the patch tokens for `head.pool: avg`, the cls token for `cls`), or every token."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import MaeframeError
from ..interop.encoder_weights import encoder_layout
from ..model.classifier import Classifier
from .checkpoint import load_checkpoint
from .pretrained import Weights, prepare_tree


def downstream_features(weights: Weights, device: torch.device, pool: str) -> Callable[[Tensor], Tensor]:
    """batch [B, *input_shape] -> CPU float rows: [B, D] as the head sees them (`pool` must be the run's
    head.pool), or [B, 1 + N, D] every encoder token (`pool` "all")."""
    prepared = prepare_tree(weights, weights.tree)
    recipe, tokenizer = prepared.recipe, prepared.components.tokenizer
    if recipe.head.features != "encoder":
        raise MaeframeError(f"{weights.path}: a classifier on raw pixels (head.features: pixels) has no encoder")
    if pool not in ("all", recipe.head.pool):
        raise MaeframeError(f"--pool {pool}: {weights.path} was trained with head.pool {recipe.head.pool}; its "
                            f"features are that pooling (--pool {recipe.head.pool}) or every token (--pool all)")
    state = load_checkpoint(weights.path)["model"]
    bn_head = "head.1.weight" in state  # the linear probe's BatchNorm before the linear layer
    classes = state["head.1.weight" if bn_head else "head.weight"].shape[0]
    layout = encoder_layout(prepared.components.weight_format, recipe.init)
    if pool == "all" and not layout.cls_token:
        raise MaeframeError(f"--pool all: {weights.path} has an encoder without cls token; use --pool avg")
    model = Classifier(tokenizer.spec, recipe.model, classes, recipe.head.pool, bn_head=bn_head, layout=layout)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise MaeframeError(f"{weights.path}: the weights do not fit the classifier its recipe describes: "
                            f"{str(err).splitlines()[0]}") from None
    model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def features(batch: Tensor) -> Tensor:
        patches = tokenizer.tokenize(batch.to(device)).patches
        rows = model.encoder(patches) if pool == "all" else model.forward_features(patches)
        return rows.float().cpu()

    return features
