"""MAE pretraining: the shared loop (`Trainer`) with `MAEStep`, reconstruction pictures and the k-NN monitor."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import MaeframeError
from ..masker import Mask
from ..model.mae import count_parameters
from .data import SeededDataset
from .fsdp import root_gathered
from .loop import Trainer
from .monitor import KnnMonitor, describe as describe_monitor
from .rundir import MetricsLog
from .step import MAEStep
from .visualize import reconstruction_panels
from ..build import build_dataset


class Pretrainer(Trainer):
    """A pretraining run. Beyond the shared loop: the per-step component state (masker, target, losses) in
    checkpoints, reconstruction pictures of held-out samples and the online k-NN monitor at epoch ends."""

    def setup(self) -> None:
        self.components = self.prepared.components
        self.monitor = (KnnMonitor(self.prepared, self.recipe.monitor, self.device, self.runtime.autocast, self.world)
                        if self.recipe.monitor is not None else None)
        self._visual_data = None

    def build_step(self) -> MAEStep:
        return MAEStep(self.prepared, self.runtime, self.world, self.lr, self.steps_per_epoch)

    # --- epoch end ---------------------------------------------------------------------------------------

    def end_epoch(self, epochs_done: int, final: bool, metrics: dict[str, float], log: MetricsLog | None):
        if self.monitor is not None and (final or epochs_done % self.recipe.monitor.knn_every_epochs == 0):
            metrics = {**metrics, **self._monitor(epochs_done, log)}
        draws = self.world.is_main or self.sharded  # a sharded model's forward needs every rank
        if draws and (epochs_done % self.recipe.runtime.visualize_interval == 0 or final):
            pictures = self.visualize(self.run_dir.path / "reconstructions" / f"epoch{epochs_done:04d}.png")
            self.trackers.log_files(self.step, pictures, "reconstructions")
        return metrics, False

    def _monitor(self, epochs_done: int, log: MetricsLog | None) -> dict[str, float]:
        """The k-NN monitor: every rank encodes its share of the bank and queries (under fsdp with the root's
        parameters gathered), rank 0 writes one metrics line at this step."""
        with root_gathered(self.model, self.sharded):
            results = self.monitor.evaluate(self.model.encoder, self.components.tokenizer)
        if self.world.is_main:
            if log is not None:
                log.write(self.step, {"epoch": epochs_done, **results})
            tqdm.write(describe_monitor(epochs_done, results))
        return results

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world.is_main:
            loss = f"{metrics['loss']:.4f}" if "loss" in metrics else "n/a"
            print(f"finished at step {self.step}: loss {loss}; run directory {self.run_dir.path}")
        return metrics

    # --- state -------------------------------------------------------------------------------------------

    def _stateful(self) -> dict[str, tuple[str, Any]]:
        """{checkpoint key: (recipe field, component)} of the components whose state a checkpoint keeps."""
        c = self.components
        return {"masker": ("masker", c.masker), "target": ("target", c.target),
                **{f"loss.{i}": (f"losses.{i}", loss) for i, (_, _, loss) in enumerate(c.losses)}}

    def extra_state(self) -> dict[str, Any]:
        return {"components": {key: part.versioned_state() for key, (_, part) in self._stateful().items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state["components"]
        for key, (field, part) in self._stateful().items():
            if key not in saved:
                raise MaeframeError(f"{field}: the checkpoint holds no state for it (it has {sorted(saved)})")
            part.load_versioned_state(saved[key], field)

    def run_facts(self) -> dict[str, Any]:
        return {
            "dataset_size": len(self.dataset),
            "params": {"encoder": count_parameters(self.model.encoder), "decoder": count_parameters(self.model.decoder)},
        }

    # --- pictures ----------------------------------------------------------------------------------------

    def predict(self, batch: torch.Tensor, mask=None):
        return self.train_step.predict(batch, mask, self.step)

    def forward_losses(self, batch: torch.Tensor, mask=None):
        return self.train_step.forward_losses(batch, mask, self.step)

    @torch.no_grad()
    def visualize(self, path: Path) -> list[Path]:
        """Save reconstructions of the first held-out samples under a fixed mask; returns the files."""
        if self._visual_data is None:  # skips unreadable files like training does
            self._visual_data = SeededDataset(build_dataset(self.prepared, "eval"))
        count = min(self.recipe.runtime.visualize_samples, len(self._visual_data))
        batch = torch.stack([self._visual_data[(i, self.recipe.seed)][0] for i in range(count)]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.seed)
            mask = self.components.masker(count, self.device)
        tokens, mask, prediction = self.train_step.predict(batch, mask, self.step, model=self.model)
        target = self.components.target(tokens, mask)
        self.model.train(was_training)
        if not self.world.is_main:  # fsdp: the other ranks only took part in the forward
            return []
        panels = reconstruction_panels(self.components, self._visual_data.dataset, tokens, mask, prediction, target)
        if panels is None:
            return []
        on_cpu = Mask(mask.ids_keep.cpu(), mask.ids_restore.cpu(), mask.masked.cpu())
        return self.components.tokenizer.save_pictures(panels.cpu(), path, on_cpu)
