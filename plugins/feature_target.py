"""Feature targets from a frozen timm teacher or an EMA copy of the encoder.

`teacher: timm` — a timm ViT built with `timm.create_model(model_name, pretrained=False, num_classes=0,
**model_kwargs)`, loaded from the local `weights` file (safetensors, or a torch pickle read with
`weights_only=True`), frozen (no gradients, eval mode) and never updated. It reads `tokens.source`
as given: the images must be normalised the way the teacher was trained (set the dataset's mean/std to
the teacher's). Its token grid must equal the tokenizer's grid.

`teacher: ema` — a copy of the student encoder made in `attach`, updated before every optimizer step as
teacher = m·teacher + (1 − m)·student, and fed the full (unmasked) token sequence. Its weights are the
target's checkpoint state. `dim` must repeat the encoder width (`model.embed_dim`) because the decoder
head is built from `out_dim` before the encoder exists; a recipe where they differ is rejected.

Both return the output of block `layer` for every token, prefix (cls/register) tokens dropped, optionally
followed by a LayerNorm without affine parameters. They run in the step's precision (the engine calls
targets under autocast) and return float32 values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from maeframe import Mask, Options, Target, TargetOut, Tokenizer, Tokens, hookimpl

_TIMM_ONLY = ("model_name", "model_kwargs", "weights")
_EMA_ONLY = ("momentum", "dim")


class FeatureOptions(Options):
    teacher: Literal["timm", "ema"] = Field(description="timm: a frozen pretrained timm ViT; ema: an "
                                                        "exponential moving average of the student encoder")
    layer: int = Field(-1, description="block whose output is the target (0-based; negative counts from the "
                                       "last block, -1 = last)")
    layer_norm: bool = Field(False, description="normalise each token's feature with a LayerNorm without "
                                                "affine parameters")
    ln_eps: float = Field(1e-6, gt=0, description="epsilon of that LayerNorm")
    model_name: str | None = Field(None, description="timm: architecture name, e.g. vit_small_patch16_224 "
                                                     "(required for teacher: timm)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm: extra keyword arguments for "
                                         "timm.create_model, e.g. {img_size: 28, patch_size: 4, in_chans: 1}")
    weights: str | None = Field(None, description="timm: path of the teacher's weights, .safetensors or a torch "
                                                  "file (.pth/.pt/.bin) in timm's key layout (required for "
                                                  "teacher: timm; nothing is downloaded)")
    momentum: float = Field(0.999, ge=0, le=1, description="ema: teacher = m·teacher + (1 − m)·student before "
                                                           "every optimizer step")
    dim: int | None = Field(None, gt=0, description="ema: the encoder width (must equal model.embed_dim; "
                                                    "required for teacher: ema)")

    @model_validator(mode="after")
    def _mode_options(self) -> FeatureOptions:
        other = _EMA_ONLY if self.teacher == "timm" else _TIMM_ONLY
        stray = sorted(set(other) & self.model_fields_set)
        if stray:
            raise ValueError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to "
                             f"teacher: {self.teacher}")
        needed = ("model_name", "weights") if self.teacher == "timm" else ("dim",)
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"teacher: {self.teacher} requires {' and '.join(missing)}")
        return self


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch file (weights_only); a nested 'model'/'state_dict' entry
    of a training checkpoint is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"teacher weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"teacher weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def build_timm_teacher(options: FeatureOptions, tokenizer: Tokenizer) -> nn.Module:
    """The frozen timm ViT (eval mode, requires_grad False) on the CPU, checked against the tokenizer."""
    import timm

    spec = tokenizer.spec
    state = load_weights(options.weights)
    try:
        teacher = timm.create_model(options.model_name, pretrained=False, num_classes=0, **options.model_kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown model names
        raise ValueError(f"timm cannot build {options.model_name!r}: {err}") from err
    patch_embed = getattr(teacher, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "grid_size") or not hasattr(teacher, "blocks") \
            or not hasattr(teacher, "forward_intermediates"):
        raise ValueError(f"timm model {options.model_name!r} is not a ViT-style model with patch_embed.grid_size, "
                         "blocks and forward_intermediates")
    teacher_grid, grid = tuple(patch_embed.grid_size), tuple(spec.grid)
    if teacher_grid != grid:
        raise ValueError(f"teacher {options.model_name} has token grid {teacher_grid} but the tokenizer's grid is "
                         f"{grid}; they must be equal")
    image = tuple(g * s for g, s in zip(spec.grid, spec.patch_size))
    if tuple(patch_embed.img_size) != image:
        raise ValueError(f"teacher {options.model_name} expects {tuple(patch_embed.img_size)} images but the "
                         f"tokenizer's input is {image}")
    in_chans = getattr(getattr(patch_embed, "proj", None), "in_channels", spec.channels)
    if in_chans != spec.channels:
        raise ValueError(f"teacher {options.model_name} takes {in_chans} channels but the tokenizer has "
                         f"{spec.channels}")
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.startswith("head.")]  # classifier weights are unused
    if missing or unexpected:
        raise ValueError(f"teacher weights {options.weights} do not fit {options.model_name}: missing keys "
                         f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    teacher.requires_grad_(False)
    return teacher.eval()


def _block_index(layer: int, depth: int, what: str) -> int:
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for {what} with {depth} blocks")
    return layer % depth


class FeatureTarget(Target):
    """values [B, N, D] float32: block `layer` of the teacher for every token (prefix tokens dropped).

    D = the teacher's width (timm: its embed_dim; ema: `dim`).
    """

    Options = FeatureOptions

    def __init__(self, options: FeatureOptions, tokenizer: Tokenizer):
        super().__init__(options, tokenizer)
        self.teacher: nn.Module | None = None
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None  # (teacher, student) parameters, ema
        self._pending: dict[str, Tensor] | None = None  # ema state loaded before attach
        if options.teacher == "timm":
            self.teacher = build_timm_teacher(options, tokenizer)
            depth = len(self.teacher.blocks)
            self._index = _block_index(options.layer, depth, f"teacher {options.model_name}")
            self._dim = int(getattr(self.teacher, "embed_dim", self.teacher.num_features))
        else:
            self._index = None  # known once the encoder is attached
            self._dim = options.dim

    @property
    def out_dim(self) -> int:
        return self._dim

    # --- EMA ---------------------------------------------------------------------------------------------

    def attach(self, model: Any) -> None:
        """ema: deep-copy `model.encoder` as the frozen teacher; timm: nothing to do."""
        if self.options.teacher != "ema":
            return
        encoder = model.encoder
        width = int(encoder.embed_dim)
        if width != self.options.dim:
            raise ValueError(f"feature target: dim {self.options.dim} does not match the encoder width {width} "
                             "(set target.options.dim to model.embed_dim)")
        self._index = _block_index(self.options.layer, len(encoder.blocks), "the encoder")
        teacher = copy.deepcopy(encoder)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self._pairs = (list(teacher.parameters()), list(encoder.parameters()))
        if self._pending is not None:
            self._load_teacher(self._pending)
            self._pending = None

    def set_progress(self, step: int, epoch: float) -> None:
        """ema: teacher = m·teacher + (1 − m)·student, in place with foreach kernels (no host sync)."""
        if self._pairs is None:
            return
        teacher, student = self._pairs
        m = self.options.momentum
        with torch.no_grad():
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1 - m)

    def state_dict(self) -> dict[str, Any]:
        """ema: {"teacher": the EMA encoder's state dict}; timm: {} (the frozen weights live in their file)."""
        if self.options.teacher != "ema":
            return {}
        if self.teacher is None:
            return {"teacher": dict(self._pending)} if self._pending is not None else {}
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.options.teacher != "ema":
            return super().load_state_dict(state)
        if set(state) != {"teacher"}:
            raise ValueError(f"feature target (ema) expects state {{'teacher'}}, got {sorted(state)}")
        if self.teacher is None:
            self._pending = state["teacher"]
        else:
            self._load_teacher(state["teacher"])

    def _load_teacher(self, weights: dict[str, Tensor]) -> None:
        self.teacher.load_state_dict(weights)  # copies in place: the foreach parameter lists stay valid

    # --- features --------------------------------------------------------------------------------------

    def _place(self, like: Tensor, dtype: bool) -> None:
        """Move the teacher to `like`'s device (and, timm only, its floating dtype) on first use."""
        param = next(self.teacher.parameters())
        want = like.dtype if dtype and like.is_floating_point() else param.dtype
        if param.device != like.device or param.dtype != want:
            self.teacher.to(device=like.device, dtype=want)

    def _ema_features(self, patches: Tensor) -> Tensor:
        """patches [B, N, patch_dim] -> block `layer` output [B, N, D] of the EMA encoder on all tokens
        (the encoder's own computation: patch embedding + positions, cls token, blocks 0..layer)."""
        (features,) = self.teacher.forward_intermediates(patches, [self._index])
        return features[:, 1:]

    def _timm_features(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> block `layer` output [B, N, D] (prefix tokens dropped by timm)."""
        (features,) = self.teacher.forward_intermediates(images, indices=[self._index], norm=False,
                                                         stop_early=True, output_fmt="NLC",
                                                         intermediates_only=True)
        return features

    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        """timm: tokens.source [B, C, H, W]; ema: tokens.patches [B, N, patch_dim] -> values [B, N, D]."""
        if self.teacher is None:
            raise RuntimeError("feature target (ema) is called before attach(model)")
        with torch.no_grad():
            if self.options.teacher == "timm":
                self._place(tokens.source, dtype=True)
                features = self._timm_features(tokens.source)
            else:
                self._place(tokens.patches, dtype=False)
                features = self._ema_features(tokens.patches)
            if self.options.layer_norm:
                features = F.layer_norm(features, (features.shape[-1],), eps=self.options.ln_eps)
        return TargetOut(features.float())


@hookimpl
def register_targets(register):
    register("feature", FeatureTarget)


@hookimpl
def validate_recipe(recipe):
    """Reject an EMA feature target whose `dim` or `layer` does not fit the recipe's encoder, or whose
    encoder is sharded (FSDP2 modules cannot be deep-copied into a teacher)."""
    if getattr(recipe, "modalities", None):
        for name, modality in recipe.modalities.items():
            if modality.target.name == "feature" and modality.target.options.get("teacher") == "ema":
                raise ValueError(f"modalities.{name}.target.options.teacher: an EMA teacher copies a single-modality "
                                 f"encoder; joint recipes take a frozen teacher (teacher: timm)")
        return
    target = recipe.target
    if target.name != "feature" or target.options.get("teacher") != "ema":
        return
    if recipe.runtime.strategy == "fsdp":
        raise ValueError("target.options.teacher: the EMA teacher is a copy of the encoder, and an encoder "
                         "sharded by runtime.strategy fsdp cannot be copied; use runtime.strategy ddp, or a "
                         "frozen teacher (teacher: timm)")
    model = recipe.model
    if target.options.get("dim") != model.embed_dim:
        raise ValueError(f"target.options.dim: {target.options.get('dim')} must equal model.embed_dim "
                         f"{model.embed_dim} (the EMA teacher is a copy of the encoder)")
    layer = target.options.get("layer", -1)
    if not -model.depth <= layer < model.depth:
        raise ValueError(f"target.options.layer: {layer} is out of range for an encoder of depth {model.depth}")
