"""The cross-modal retrieval protocol (`task: retrieval`): a joint checkpoint's encoder embeds every modality of
held-out paired samples, each modality alone and unmasked, pooled as the model pools it for its cross-modal
losses (`model.pooled_latent`), and every ordered pair of modalities (a, b) is scored by recall@k of a -> b
retrieval (query: sample i's a; its match: sample i's b, among all held-out samples' b). Each modality's own
k-NN top-1 (bank: the training pairs without augmentation) comes with it. Nothing is trained; the run writes
results.json. Modality names come from the checkpoint's recipe: metrics read `retrieval/<a>_to_<b>/R@k` and
`knn/<a>/top1`. Under torchrun each rank embeds its share and gathers the rest (the result equals one
process's)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..build import Prepared, build_dataset, prepare
from ..errors import MaeframeError, RecipeError
from ..masker import Mask
from ..model.joint import JointMaskedAutoencoder
from ..recipe import RECIPE_ADAPTER, dump_recipe
from .checkpoint import load_checkpoint
from .distributed import barrier, map_dataset, shutdown_world
from .knn import knn_scores
from .metrics import classification_metrics, write_results
from .recall import recall_at
from .rundir import RunDirectory
from .runtime import start_process
from .window import device_name


def read_joint_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, its recipe as a dict) of a joint pretraining checkpoint with paired modalities; a MaeframeError
    naming init.checkpoint otherwise."""
    if not Path(path).expanduser().exists():
        raise MaeframeError(f"init.checkpoint: {path} does not exist (pretrain a joint recipe first, e.g. "
                            f"`maeframe run recipes/cav_mae_klettres.yaml`)")
    try:
        state = load_checkpoint(Path(path).expanduser())
    except Exception as err:  # not a torch file, a truncated one, another program's pickle
        raise MaeframeError(f"init.checkpoint: cannot read {path} as a maeframe checkpoint: {err}") from err
    recipe = state.get("recipe") if isinstance(state, dict) else None
    if not isinstance(recipe, dict) or "model" not in state:
        raise MaeframeError(f"init.checkpoint: {path} is not a maeframe pretraining checkpoint (no recipe/model)")
    if not recipe.get("modalities") or recipe.get("mixing") != "paired":
        kind = "a single-modality" if not recipe.get("modalities") else f"a mixing: {recipe.get('mixing')}"
        raise MaeframeError(f"init.checkpoint: {path} is {kind} checkpoint; retrieval compares the modalities of "
                            f"paired samples, so it needs a joint checkpoint trained with mixing: paired "
                            f"(e.g. runs/cav_mae_klettres/last.pt)")
    return state, recipe


def unmasked(batch: int, tokens: int, device: torch.device) -> Mask:
    """A Mask hiding nothing: every one of `tokens` tokens visible, in grid order."""
    ids = torch.arange(tokens, device=device).expand(batch, -1)
    return Mask(ids, ids, torch.zeros(batch, tokens, device=device))


class RetrievalTask:
    """A `task: retrieval` run; `train()` (the dispatcher's verb; nothing is trained) embeds the bank and the
    held-out pairs, scores retrieval and k-NN, and rank 0 writes results.json into a guarded run directory."""

    def __init__(self, prepared: Prepared, resume: bool | str = False):
        if resume is True:
            raise MaeframeError("--resume: a retrieval run trains nothing; run it again under another name")
        self.recipe = recipe = prepared.recipe
        state, joint_recipe = read_joint_checkpoint(recipe.init.checkpoint)
        try:
            joint = prepare(RECIPE_ADAPTER.validate_python(joint_recipe))
        except RecipeError as err:
            raise MaeframeError(f"init.checkpoint: the recipe stored in {recipe.init.checkpoint} no longer "
                                f"validates: {err}") from err
        self.joint_recipe = joint.recipe
        self.modalities = list(joint.modalities)
        self.world, self.runtime = start_process(recipe.runtime, recipe.seed)
        # the retrieval recipe's data, built at the checkpoint's input shapes ({modality: shape})
        for field, ref in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
            if not prepared.registry.get("dataset", ref.name).cls.paired:
                raise MaeframeError(f"{field}.name: retrieval reads paired samples (every modality of "
                                    f"{', '.join(self.modalities)} per sample, Dataset.paired); {ref.name!r} "
                                    f"yields one")
        data_view = dataclasses.replace(joint, recipe=recipe, source=prepared.source)
        self.bank_set = build_dataset(data_view, "train", augment=False)
        self.eval_set = build_dataset(data_view, "eval")
        self.tokenizers = {name: c.tokenizer for name, c in joint.modalities.items()}
        self.model = self._model(joint, state).to(self.runtime.device).eval().requires_grad_(False)
        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume, self.world.is_main)
        barrier(self.world)

    def _model(self, joint: Prepared, state: dict[str, Any]) -> torch.nn.Module:
        """The checkpoint's JointMaskedAutoencoder (as joint pretraining builds it), its weights loaded unless
        `init.random_weights`."""
        torch.manual_seed(self.recipe.seed)  # the random-weights baseline is a function of the seed
        flows = joint.modalities
        model = JointMaskedAutoencoder({name: c.tokenizer.spec for name, c in flows.items()},
                                       {name: c.target.out_dim for name, c in flows.items()},
                                       joint.recipe.model, typed=True)
        if not self.recipe.init.random_weights:
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
            if missing or unexpected:
                raise MaeframeError(f"init.checkpoint: {self.recipe.init.checkpoint} does not fit its own recipe's "
                                    f"model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch {modality: [B, ...]} -> [B, M·D]: each modality's representation, modality by modality."""
        rows = []
        with self.runtime.autocast():
            for name in self.modalities:
                patches = self.tokenizers[name].tokenize(batch[name].to(self.runtime.device)).patches
                mask = unmasked(patches.shape[0], patches.shape[1], patches.device)
                latent, pooled = self.model.encoder({name: patches}, {name: mask})
                rows.append(pooled[name] if name in pooled else latent[:, 1:].mean(1))
        return torch.cat(rows, dim=1).float().cpu()

    def features(self, dataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows, labels = map_dataset(self.embed, dataset, self.world, self.recipe.data.batch_size,
                                   self.recipe.data.num_workers)
        return dict(zip(self.modalities, rows.chunk(len(self.modalities), dim=1))), labels

    def train(self) -> dict[str, Any]:
        recipe, config = self.recipe, self.recipe.retrieval
        if self.world.is_main:
            self.run_dir.write_text("recipe.yaml", dump_recipe(recipe))
        start = time.perf_counter()
        bank, bank_labels = self.features(self.bank_set)
        held_out, labels = self.features(self.eval_set)
        pairs = len(labels)
        final: dict[str, float] = {}
        chance = {f"R@{k}": min(k, pairs) / pairs for k in config.ks}
        for a in self.modalities:
            for b in self.modalities:
                if a != b:
                    for metric, value in recall_at(held_out[a], held_out[b], tuple(config.ks)).items():
                        final[f"retrieval/{a}_to_{b}/{metric}"] = value
        classes = [str(c) for c in (self.bank_set.classes or [])]
        if classes and labels.dim() == 1:
            for name in self.modalities:
                scores = knn_scores(bank[name], bank_labels, held_out[name], config.knn_k, config.knn_temperature,
                                    len(classes))
                final[f"knn/{name}/top1"] = classification_metrics(scores, labels, classes)["top1"] / 100
        representation = self.joint_recipe.model.pooled_latent
        results: dict[str, Any] = {
            "task": "retrieval", "name": recipe.name, "seed": recipe.seed, "init": recipe.init.model_dump(mode="json"),
            "modalities": self.modalities, "pairs": pairs, "bank": len(bank_labels), "chance": chance,
            "representation": representation if representation != "none" else "mean of the modality's tokens",
            "knn": {"k": config.knn_k, "temperature": config.knn_temperature}, "final": final,
            "complete": True, "world_size": self.world.world_size, "seconds": round(time.perf_counter() - start, 2),
            "maeframe": __version__, "device": device_name(self.runtime.device),
        }
        if self.world.is_main:
            results["path"] = str(write_results(self.run_dir.path, results, classes))
            print(f"retrieval {recipe.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items())
                  + f" (chance R@1 {chance.get('R@1', 1 / pairs):.3f}, {pairs} pairs)")
        barrier(self.world)
        shutdown_world(self.world)
        return results
