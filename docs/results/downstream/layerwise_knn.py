"""Which block and pooling of an encoder give the best k-NN features? (investigation helper, not a CLI)

One pass over the k-NN task's data with hooks on every transformer block: for each block's output the
mean of the patch tokens (avg) and the cls token, each without and (for the last block) with the final
LayerNorm, then the k-NN task's classifier (`maeframe.engine.knn.knn_accuracy`: cosine, k 20, T 0.07).
The encoder is built exactly as `maeframe run recipes/knn_fmnist.yaml` builds it.

    python docs/results/downstream/layerwise_knn.py OUT.json [dotted.override ...]
e.g. ... layerwise.json init.checkpoint=runs/pt_s0/last.pt data.train.options.limit=10000 data.eval.options.limit=5000
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maeframe.build import build_dataset, prepare
from maeframe.engine.knn import knn_accuracy
from maeframe.engine.knn_eval import build_encoder

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "knn_fmnist.yaml"


@torch.no_grad()
def block_features(encoder, tokenizer, dataset, batch_size: int = 500) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{"block{i}/avg"|"block{i}/cls"|"final/avg"|"final/cls": [N, D]}, labels [N]."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in encoder.blocks]
    features: dict[str, list[torch.Tensor]] = {}
    labels = []
    for batch, label in DataLoader(dataset, batch_size=batch_size, generator=torch.Generator()):
        outputs.clear()
        final = encoder(tokenizer.tokenize(batch).patches)
        for name, latent in [*((f"block{i}", out) for i, out in enumerate(outputs)), ("final", final)]:
            features.setdefault(f"{name}/avg", []).append(latent[:, 1:].mean(1))
            features.setdefault(f"{name}/cls", []).append(latent[:, 0])
        labels.append(torch.as_tensor(label))
    for hook in hooks:
        hook.remove()
    return {key: torch.cat(value) for key, value in features.items()}, torch.cat(labels)


def main(out: str, overrides: list[str]) -> None:
    prepared = prepare(RECIPE, overrides)
    recipe = prepared.recipe
    torch.manual_seed(recipe.seed)
    encoder = build_encoder(prepared, torch.device("cpu"))
    tokenizer = prepared.components.tokenizer
    bank, bank_labels = block_features(encoder, tokenizer, build_dataset(prepared, "train", augment=False))
    queries, labels = block_features(encoder, tokenizer, build_dataset(prepared, "eval"))
    results = {key: round(100 * knn_accuracy(bank[key], bank_labels, queries[key], labels, recipe.knn.k,
                                             recipe.knn.temperature), 2) for key in bank}
    record = {"init": recipe.init.model_dump(mode="json"), "seed": recipe.seed, "bank": len(bank_labels),
              "queries": len(labels), "k": recipe.knn.k, "temperature": recipe.knn.temperature, "top1": results}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
