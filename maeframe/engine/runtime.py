"""Device, precision, seeding and the RNG state that exact resume saves and restores."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RecipeError
from ..recipe import RuntimeConfig
from .distributed import World, init_world

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a run computes."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32

    def autocast(self):
        """Mixed precision for the model's forward; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    @property
    def uses_scaler(self) -> bool:
        return self.precision == "fp16"


STATIC_GRAPHS = 64  # token counts one compiled module may see: a curriculum from mask 0.5 to 0.75 on 196 tokens has 50


def compile_static(module: torch.nn.Module, mode: str = "default", backend: str = "inductor"):
    """`torch.compile` with static shapes: one graph per input shape, never a dynamic-shape graph.

    A training step's shapes are fixed by construction (masks keep a fixed token count); the few that change
    (a curriculum masker's visible-token count, a fine-tune's last partial batch, evaluation batches) each
    get their own graph, compiled once and reused. torch's default would turn the changed dimension
    symbolic, and the dynamic-shape kernels torch 2.11's inductor generated for the MAE step failed on an
    H100 with "shape '[400, 1024]' is invalid for input of size 8" (benchmarks/README.md, GPU). torch's
    recompile limit (8 graphs per function, then eager for every new shape) is raised to `STATIC_GRAPHS`, so
    a scheduled mask ratio keeps its compiled speed: one compile per token count (~40 s for ViT-B on an H100)
    is little next to a pretraining run."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, STATIC_GRAPHS)
    return torch.compile(module, mode=mode, dynamic=False, backend=backend)


def start_process(config: RuntimeConfig, seed: int) -> tuple[World, Runtime]:
    """Join torchrun's process group (a world of one without it), pick this process's device and precision,
    and seed every global generator: the start of every task."""
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world = init_world("cuda" if wants_cuda else "cpu")
    runtime = select_runtime(config, world.local_rank)
    seed_everything(seed)
    return world, runtime


def select_runtime(config: RuntimeConfig, local_rank: int = 0) -> Runtime:
    """The device (this process's GPU under torchrun) and the precision a recipe asks for."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError([("runtime.device", "is 'cuda' but torch sees no CUDA device here (set auto or cpu)")])
    if config.threads:
        torch.set_num_threads(config.threads)
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return Runtime(device, precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _numpy_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor, so weights_only loading accepts it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
