"""One optimizer step and the state it owns: `OptimizerStep` (shared by every task) and `MAEStep`.

`OptimizerStep` holds the model (wrapped in DDP, or sharded in place by FSDP2, and/or compiled), the
optimizer, the lr schedule and the grad scaler, and runs: losses of each micro-batch (the task's
`losses`) -> backward (accumulated; gradients reduced after the last micro-batch) -> clip -> update. A step
with a non-finite loss or gradient norm is not applied: fused AdamW receives a device-side `found_inf`
flag and skips the update without a host sync (the host reads the counters at the logging interval);
another optimizer (LARS) is skipped after one host read of the flag. Under fsdp the parameters, gradients
and AdamW state are DTensor shards and the gradient norm is the global one, so every process skips the
same steps. Stochastic depth draws for the global micro-batch from a stream seeded by (seed, step,
micro-batch), and each process keeps its rows (`RowDropPath`): N processes follow one.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from ..build import Prepared
from ..errors import MaeframeError
from ..masker import Mask
from ..model import MaskedAutoencoder
from ..model.drop_path import set_drop_rows
from .data import DROP_PATH_STREAM, stream_seed
from .checkpoint import load_dcp_into
from .distributed import World, any_rank
from .fsdp import full_value, local_part, shard_model
from .optim import build_optimizer, build_schedule
from .runtime import Runtime, compile_static

Batch = tuple[Tensor, Tensor]  # (inputs [B, *input_shape], labels [B] or [B, C]) on the device


class OptimizerStep:
    """`step(step, micro_batches)` -> detached device metrics {loss, loss/<term>, grad_norm}. Subclasses
    give `losses(inputs, labels, step, micro)` and may add work before (`begin`) and after (`end`) a step."""

    # True when a step may leave some parameters without a gradient (a joint model trained on one modality per
    # step): DDP then looks for them after each backward
    find_unused_parameters = False

    def __init__(self, model: nn.Module, prepared: Prepared, runtime: Runtime, world: World, lr: float,
                 steps_per_epoch: int, build_optimizer):
        recipe = prepared.recipe
        self.runtime, self.device, self.world = runtime, runtime.device, world
        self.seed, self.steps_per_epoch = recipe.seed, steps_per_epoch
        self.clip_grad = recipe.optim.clip_grad
        self.model = model.to(self.device)
        self.drops = set_drop_rows(self.model, world.rank * recipe.data.batch_size,
                                   world.world_size * recipe.data.batch_size)
        self.sharded = recipe.runtime.strategy == "fsdp"
        self.ddp = None
        wrapped = self.model
        if self.sharded:
            shard_model(self.model, runtime.precision, world, self.device)
        elif world.distributed:
            ids = [world.local_rank] if self.device.type == "cuda" else None
            wrapped = self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False,
                                                         find_unused_parameters=self.find_unused_parameters)
        self.step_model = compile_static(wrapped, recipe.runtime.compile_mode) if recipe.runtime.compile else wrapped
        self.cuda_graphs = recipe.runtime.cuda_graphs
        self.optimizer = build_optimizer(self.model)
        self.skips_on_device = isinstance(self.optimizer, torch.optim.AdamW) and bool(self.optimizer.defaults["fused"])
        self.schedule = build_schedule(self.optimizer, recipe.optim, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.uses_scaler)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)

    # --- what a task supplies ------------------------------------------------------------------------

    def losses(self, inputs: Tensor, labels: Tensor, step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {label: term}) of one micro-batch; runs the model through `self.forward`."""
        raise NotImplementedError

    def begin(self, step: int) -> None:
        """Before the step's first micro-batch."""

    def end(self, step: int) -> None:
        """After the update (applied or skipped)."""

    @contextlib.contextmanager
    def model_rng(self, step: int, micro: int):
        """The model's forward draws (stochastic depth) from a stream seeded by (seed, step, micro-batch),
        the same on every process; the global stream (masks) is left as it was."""
        if not (self.drops and self.model.training):
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(stream_seed(self.seed, step, micro, DROP_PATH_STREAM))
            yield

    # --- the step --------------------------------------------------------------------------------------

    def __call__(self, step: int, micro_batches: list[Batch]) -> dict[str, Tensor]:
        """Accumulate gradients over the micro-batches and apply one update unless non-finite."""
        self.schedule.step_update(step)
        self.begin(step)
        sums: dict[str, Tensor] = {}
        accum = len(micro_batches)
        for i, (inputs, labels) in enumerate(micro_batches):
            last = i == accum - 1
            if self.sharded:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            if self.cuda_graphs:  # the previous micro-batch's graph outputs are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                total, terms = self.losses(inputs, labels, step, i)
                self.scaler.scale(total / accum).backward()
            for key, value in {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach().float() / accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad or math.inf))
        found = ~(torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm))
        if self.skips_on_device and not self.runtime.uses_scaler:  # the scaler passes its own flag
            self.optimizer.found_inf = found.float()
        if self.skips_on_device or self.runtime.uses_scaler or not bool(found):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += found
        self.first_nonfinite = torch.where(found & (self.first_nonfinite < 0), step, self.first_nonfinite)
        self.end(step)
        sums["grad_norm"] = grad_norm.detach()
        return sums

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"model": {fqn: tensor}, "optimizer": state keyed by parameter FQN, "scaler", "nonfinite"}.
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
                raise MaeframeError("this checkpoint keeps optimizer state by parameter index (maeframe before "
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


class MAEStep(OptimizerStep):
    """tokenize -> mask -> MaskedAutoencoder -> target -> weighted losses."""

    def __init__(self, prepared: Prepared, runtime: Runtime, world: World, lr: float, steps_per_epoch: int):
        recipe = prepared.recipe
        self.components = prepared.components
        model = MaskedAutoencoder(self.components.tokenizer.spec, self.components.target.out_dim, recipe.model)
        super().__init__(model, prepared, runtime, world, lr, steps_per_epoch,
                         lambda module: build_optimizer(module, recipe.optim, lr, runtime.device))
        for component in self.components.all():
            component.attach(self.model)

    def begin(self, step: int) -> None:
        for component in self.components.all():
            component.set_progress(step, step / self.steps_per_epoch)

    def draw_mask(self, batch_size: int) -> Mask:
        """Masks for this process's slice of the global batch: every process draws the global batch's
        masks from the same RNG stream, so N processes mask exactly as one process with an N× batch."""
        full = self.components.masker(batch_size * self.world.world_size, self.device)
        start = self.world.rank * batch_size
        return full.rows(start, start + batch_size)

    def predict(self, batch: Tensor, mask: Mask | None = None, step: int = 0, model=None, micro: int = 0):
        """batch [B, *input_shape] on device -> (tokens, mask, prediction). `model` overrides the
        (wrapped, compiled) training model, e.g. the plain model for pictures drawn by one process."""
        tokens = self.components.tokenizer.tokenize(batch)
        mask = mask if mask is not None else self.draw_mask(batch.shape[0])
        with self.model_rng(step, micro), self.runtime.autocast():
            prediction = (model or self.step_model)(tokens.patches, mask)
        return tokens, mask, prediction

    def forward_losses(self, batch: Tensor, mask: Mask | None = None, step: int = 0, micro: int = 0):
        """batch [B, *input_shape] on device -> (total loss, {label: term}, tokens, mask, prediction)."""
        c = self.components
        tokens, mask, prediction = self.predict(batch, mask, step, micro=micro)
        with torch.no_grad(), self.runtime.autocast():
            target = c.target(tokens, mask)
        terms = {label: loss(prediction, target, mask) for label, _, loss in c.losses}
        total = sum(weight * terms[label] for label, weight, _ in c.losses)
        return total, terms, tokens, mask, prediction

    def losses(self, inputs: Tensor, labels: Tensor, step: int, micro: int):
        total, terms, *_ = self.forward_losses(inputs, step=step, micro=micro)
        return total, terms
