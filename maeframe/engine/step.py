"""One optimizer step of masked-autoencoder training, and the state it owns.

`TrainStep` holds the model (wrapped in DDP, or sharded in place by FSDP2, and/or compiled), AdamW, the lr
schedule and the grad scaler, and runs: tokenize -> mask -> model -> target -> losses -> backward
(accumulated) -> clip -> AdamW. A step with a non-finite loss or gradient norm is not applied: fused AdamW
receives a device-side `found_inf` flag and skips the update, so no host sync is needed; the host reads the
counters at the logging interval. Under fsdp the parameters, gradients and AdamW state are DTensor shards:
fused AdamW updates each process's shards (the 0-dim `found_inf` counts as replicated) and the gradient
norm is the global one (an all-reduce inside `clip_grad_norm_`), so every process skips the same steps.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from ..build import Prepared
from ..errors import MaeframeError
from ..masker import Mask
from ..model import MaskedAutoencoder
from .data import sample_seed
from .dcp_checkpoint import load_dcp_into
from .distributed import World, any_rank
from .fsdp import full_value, local_part, shard_model
from .optim import build_optimizer, build_schedule
from .runtime import Runtime, compile_static


class TrainStep:
    def __init__(self, prepared: Prepared, runtime: Runtime, world: World, lr: float, steps_per_epoch: int):
        recipe = prepared.recipe
        self.components = prepared.components
        self.runtime, self.device, self.world = runtime, runtime.device, world
        self.seed, self.steps_per_epoch = recipe.seed, steps_per_epoch
        self.clip_grad = recipe.optim.clip_grad
        spec = self.components.tokenizer.spec
        self.model = MaskedAutoencoder(spec, self.components.target.out_dim, recipe.model).to(self.device)
        wrapped = self.model
        self.sharded = recipe.runtime.strategy == "fsdp"
        if self.sharded:
            shard_model(self.model, runtime.precision, world, self.device)
        elif world.distributed:
            ids = [world.local_rank] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.step_model = compile_static(wrapped, recipe.runtime.compile_mode) if recipe.runtime.compile else wrapped
        self.cuda_graphs = recipe.runtime.cuda_graphs
        self.optimizer = build_optimizer(self.model, recipe.optim, lr, self.device)
        self.schedule = build_schedule(self.optimizer, recipe.optim, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.uses_scaler)
        self.rank_rng = world.distributed and recipe.model.drop_path > 0
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)
        for component in self.components.all():
            component.attach(self.model)

    # --- forward ---------------------------------------------------------------------------------------

    def draw_mask(self, batch_size: int) -> Mask:
        """Masks for this process's slice of the global batch: every process draws the global batch's
        masks from the same RNG stream, so N processes mask exactly as one process with an N× batch."""
        full = self.components.masker(batch_size * self.world.world_size, self.device)
        start = self.world.rank * batch_size
        return full.rows(start, start + batch_size)

    def predict(self, batch: torch.Tensor, mask: Mask | None = None, step: int = 0, model=None):
        """batch [B, *input_shape] on device -> (tokens, mask, prediction). `model` overrides the
        (wrapped, compiled) training model, e.g. the plain model for pictures drawn by one process."""
        tokens = self.components.tokenizer.tokenize(batch)
        mask = mask if mask is not None else self.draw_mask(batch.shape[0])
        with self._model_rng(step), self.runtime.autocast():
            prediction = (model or self.step_model)(tokens.patches, mask)
        return tokens, mask, prediction

    def forward_losses(self, batch: torch.Tensor, mask: Mask | None = None, step: int = 0):
        """batch [B, *input_shape] on device -> (total loss, {label: term}, tokens, mask, prediction)."""
        c = self.components
        tokens, mask, prediction = self.predict(batch, mask, step)
        with torch.no_grad(), self.runtime.autocast():
            target = c.target(tokens, mask)
        terms = {label: loss(prediction, target, mask) for label, _, loss in c.losses}
        total = sum(weight * terms[label] for label, weight, _ in c.losses)
        return total, terms, tokens, mask, prediction

    @contextlib.contextmanager
    def _model_rng(self, step: int):
        """Under DDP with stochastic depth, the model draws from a per-process stream, so processes do
        not share drop patterns while the global stream (masks) stays identical on every process."""
        if not self.rank_rng:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(sample_seed(self.seed, step, self.world.rank))
            yield

    # --- the step --------------------------------------------------------------------------------------

    def __call__(self, step: int, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accumulate gradients over the micro-batches and apply one update unless non-finite.
        Returns detached device tensors: loss, loss/<label>, grad_norm."""
        self.schedule.step_update(step)
        for component in self.components.all():
            component.set_progress(step, step / self.steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        accum = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            sync = i == accum - 1 or not isinstance(self.step_model, DistributedDataParallel)
            if self.sharded:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == accum - 1)
            if self.cuda_graphs:  # the previous micro-batch's graph outputs are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with contextlib.nullcontext() if sync else self.step_model.no_sync():
                total, terms, *_ = self.forward_losses(batch, step=step)
                self.scaler.scale(total / accum).backward()
            for key, value in {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach().float() / accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad or math.inf))
        found = ~(torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm))
        if not self.runtime.uses_scaler:  # the scaler passes its own flag
            self.optimizer.found_inf = found.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += found
        self.first_nonfinite = torch.where(found & (self.first_nonfinite < 0), step, self.first_nonfinite)
        sums["grad_norm"] = grad_norm.detach()
        return sums

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"model": {fqn: tensor}, "optimizer": AdamW state keyed by parameter FQN, "scaler", "nonfinite"}.
        Under fsdp the model and optimizer tensors are this process's DTensor shards (for DCP)."""
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "nonfinite": self.nonfinite.cpu()}

    def load_state_dict(self, state: dict, shards: Path | None = None) -> None:
        """Restore from a single-file checkpoint's dict (full tensors, resharded under fsdp), or, with
        `shards`, the model and optimizer from that DCP directory and the rest from `state`."""
        if shards is not None:
            model, optimizer = get_state_dict(self.model, self.optimizer)
            load_dcp_into(shards, {"model": model, "optimizer": optimizer})
            set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optimizer)
        elif isinstance(state["optimizer"]["param_groups"][0]["params"][0], int):  # before FQN-keyed state
            if self.sharded:
                raise MaeframeError("this checkpoint keeps AdamW state by parameter index (maeframe before "
                                    "fsdp); resume it once with runtime.strategy=ddp, then switch to fsdp")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scaler.load_state_dict(state["scaler"])
        self.nonfinite.copy_(state.get("nonfinite", torch.zeros((), dtype=torch.long)))

    def model_is_finite(self) -> bool:
        """One host sync; used before writing a checkpoint. Under fsdp every process checks its shards and
        they agree with one collective (ddp replicas are identical: no collective)."""
        finite = bool(torch.stack([torch.isfinite(local_part(p)).all() for p in self.model.parameters()]).all())
        return not any_rank(not finite, self.world, self.device) if self.sharded else finite
