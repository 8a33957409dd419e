"""Joint pretraining: the shared loop with `JointMAEStep`, the modality mixture's data, and reconstruction
pictures per modality (reconstructions/<modality>/epochNNNN.png)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..build import build_dataset
from ..masker import Mask
from ..model.joint import ModalityEncoder
from ..model.mae import count_parameters
from .data import SeededDataset, make_loader
from .joint_step import JointMAEStep
from .fsdp import root_gathered
from .mixture import MixtureBatchSampler, MixtureDataset
from .monitor import KnnMonitor, describe as describe_monitor
from .pretrain import Pretrainer
from .visualize import reconstruction_panels


class JointPretrainer(Pretrainer):
    """A pretraining run of a joint recipe (`modalities`). Alternate mixing reads every modality's own data
    through `MixtureDataset` / `MixtureBatchSampler`; paired mixing reads the one paired dataset as usual."""

    def setup(self) -> None:
        self.components = None
        config = self.recipe.monitor  # alternate mixing only (validation): one monitor per modality's data
        self.monitors = {} if config is None else {
            name: KnnMonitor(self.prepared, config, self.device, self.runtime.autocast, self.world, modality=name)
            for name in self.prepared.modalities}
        self.monitor = next(iter(self.monitors.values()), None)  # the loop's "is there a monitor" test
        self._visual_data: dict[str, Any] = {}

    @property
    def alternate(self) -> bool:
        return self.recipe.mixing == "alternate"

    def build_train_set(self):
        if not self.alternate:
            return build_dataset(self.prepared, "train")
        return MixtureDataset({name: build_dataset(self.prepared, "train", modality=name)
                               for name in self.prepared.modalities})

    def build_loader(self, dataset):
        if not self.alternate:
            return super().build_loader(dataset)
        recipe = self.recipe
        sampler = MixtureBatchSampler({name: len(d) for name, d in dataset.datasets.items()},
                                      {name: m.weight for name, m in recipe.modalities.items()},
                                      recipe.data.batch_size, recipe.seed, self.world.rank, self.world.world_size,
                                      recipe.optim.accum_steps)
        return sampler, make_loader(dataset, recipe.data, sampler, pin_memory=self.device.type == "cuda",
                                    seeded=False)

    def build_step(self) -> JointMAEStep:
        return JointMAEStep(self.prepared, self.runtime, self.world, self.lr, self.steps_per_epoch)

    def _monitor(self, epochs_done: int, log) -> dict[str, float]:
        """Every modality's k-NN monitor on its view of the encoder, logged as monitor/<modality>/knn_top1, ..."""
        results: dict[str, float] = {}
        with root_gathered(self.model, self.sharded):
            for name, monitor in self.monitors.items():
                found = monitor.evaluate(ModalityEncoder(self.model.encoder, name), self.prepared.modalities[name].tokenizer)
                if self.world.is_main:
                    tqdm.write(f"{name}: " + describe_monitor(epochs_done, found))
                results.update({key.replace("monitor/", f"monitor/{name}/"): value for key, value in found.items()})
        if self.world.is_main and log is not None:
            log.write(self.step, {"epoch": epochs_done, **results})
        return results

    # --- state -------------------------------------------------------------------------------------------

    def _stateful(self) -> dict[str, tuple[str, Any]]:
        out: dict[str, tuple[str, Any]] = {}
        for name, c in self.prepared.modalities.items():
            field = f"modalities.{name}"
            out[f"{name}.masker"] = (f"{field}.masker", c.masker)
            out[f"{name}.target"] = (f"{field}.target", c.target)
            out.update({f"{name}.loss.{i}": (f"{field}.losses.{i}", loss) for i, (_, _, loss) in enumerate(c.losses)})
        out.update({f"joint_loss.{i}": (f"joint_losses.{i}", loss)
                    for i, (_, _, loss) in enumerate(self.prepared.joint_losses)})
        return out

    def run_facts(self) -> dict[str, Any]:
        sizes = ({name: len(d) for name, d in self.dataset.datasets.items()} if self.alternate
                 else len(self.dataset))
        return {"dataset_size": sizes, "mixing": self.recipe.mixing,
                "params": {"encoder": count_parameters(self.model.encoder),
                           "decoder": count_parameters(self.model.decoder)}}

    # --- pictures ----------------------------------------------------------------------------------------

    def _eval_set(self, modality: str | None) -> SeededDataset:
        key = modality or ""
        if key not in self._visual_data:  # skips unreadable files like training does
            self._visual_data[key] = SeededDataset(build_dataset(self.prepared, "eval", modality=modality))
        return self._visual_data[key]

    @torch.no_grad()
    def visualize(self, path: Path) -> list[Path]:
        """Reconstructions of the first held-out samples of every modality under fixed masks, drawn by that
        modality's tokenizer into reconstructions/<modality>/<name of `path`>; returns the files."""
        groups = [[name] for name in self.prepared.modalities] if self.alternate else [list(self.prepared.modalities)]
        files: list[Path] = []
        for names in groups:
            data = self._eval_set(names[0] if self.alternate else None)
            count = min(self.recipe.runtime.visualize_samples, len(data))
            items = [data[(i, self.recipe.seed)][0] for i in range(count)]
            if not isinstance(items[0], dict):
                items = [{names[0]: item} for item in items]
            inputs = {name: torch.stack([item[name] for item in items]).to(self.device) for name in names}
            files += self._draw(inputs, data.dataset, path)
        return files

    def _draw(self, inputs: dict[str, torch.Tensor], dataset, path: Path) -> list[Path]:
        was_training = self.model.training
        self.model.eval()
        names = list(inputs)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.seed)
            count = next(iter(inputs.values())).shape[0]
            masks = {name: self.prepared.modalities[name].masker(count, self.device) for name in names}
        tokens, masks, predictions = self.train_step.predict(inputs, masks, self.step, model=self.model)
        self.model.train(was_training)
        if not self.world.is_main:  # fsdp: the other ranks only took part in the forward
            return []
        files = []
        for name in names:
            flow = self.prepared.modalities[name]
            target = flow.target(tokens[name], masks[name])
            panels = reconstruction_panels(flow, dataset, tokens[name], masks[name], predictions[name], target)
            if panels is None:
                continue
            mask = masks[name]
            on_cpu = Mask(mask.ids_keep.cpu(), mask.ids_restore.cpu(), mask.masked.cpu())
            files += flow.tokenizer.save_pictures(panels.cpu(), path.parent / name / path.name, on_cpu)
        return files
