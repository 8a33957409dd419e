"""The typed recipe: YAML -> pydantic `Recipe`, dotted overrides, and component option validation.

Validation runs in two passes. `load_recipe` checks the schema (unknown keys, types, ranges). `resolve`
then looks each component up in the registry and validates its `options` against that component's own
`Options`, so every error names its field path, e.g. `masker.options.ratio`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PluginError, RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentRef(Strict):
    name: str = Field(description="registered component name; `maeframe plugins` lists them")
    options: dict[str, Any] = Field(default_factory=dict, description="the component's own options")


class LossRef(ComponentRef):
    weight: float = Field(1.0, ge=0, description="multiplier of this term in the total loss")


class ModelConfig(Strict):
    embed_dim: int = Field(768, gt=0, description="encoder width")
    depth: int = Field(12, gt=0, description="encoder blocks")
    num_heads: int = Field(12, gt=0, description="encoder attention heads")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / embed_dim, encoder and decoder")
    decoder_embed_dim: int = Field(512, gt=0, description="decoder width")
    decoder_depth: int = Field(8, gt=0, description="decoder blocks")
    decoder_num_heads: int = Field(16, gt=0, description="decoder attention heads")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate of the last encoder block")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        for dim, heads, prefix in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if dim % heads:
                raise ValueError(f"{prefix}embed_dim {dim} is not divisible by {prefix}num_heads {heads}")
        return self


class DataConfig(Strict):
    train: ComponentRef = Field(description="training dataset component")
    eval: ComponentRef | None = Field(None, description="held-out dataset for pictures, PSNR and kNN "
                                                        "(default: the training data without augmentation)")
    batch_size: int = Field(gt=0, description="samples per step on one device (before accumulation)")
    num_workers: int = Field(4, ge=0, description="DataLoader worker processes")
    pin_memory: bool = Field(True, description="page-locked host batches for faster copies to the GPU")
    persistent_workers: bool = Field(True, description="keep workers alive across epochs")
    prefetch_factor: int = Field(2, gt=0, description="batches each worker prepares ahead")


class OptimConfig(Strict):
    epochs: int = Field(gt=0, description="training epochs")
    warmup_epochs: float = Field(0, ge=0, description="linear warmup length, applied per iteration")
    base_lr: float = Field(1.5e-4, gt=0, description="lr = base_lr * effective_batch / 256 (MAE scaling rule)")
    lr: float | None = Field(None, gt=0, description="absolute peak lr; when set, base_lr scaling is skipped")
    min_lr: float = Field(0.0, ge=0, description="lr at the end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; none on norms, biases, pos-embeds, tokens")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    accum_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    clip_grad: float | None = Field(None, gt=0, description="max global grad norm; null disables clipping")

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class RuntimeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    output_dir: str = Field("runs", description="runs are written to <output_dir>/<name>/")
    log_interval: int = Field(50, gt=0, description="steps between metric lines (the only host syncs)")
    checkpoint_interval: int = Field(20, gt=0, description="epochs between kept periodic checkpoints")
    visualize_interval: int = Field(1, gt=0, description="epochs between reconstruction PNGs")
    visualize_samples: int = Field(8, gt=0, description="samples shown in each reconstruction PNG")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (smoke runs)")
    tensorboard: bool = Field(True, description="also write TensorBoard event files")
    progress_bar: bool = Field(True, description="show a progress bar on the terminal")


class Recipe(Strict):
    task: Literal["pretrain"] = Field("pretrain", description="what the recipe runs")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run directory name")
    seed: int = Field(0, description="seeds model init, masks, data order and augmentation")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import by name")
    tokenizer: ComponentRef = Field(description="turns samples into patches; fixes the token grid")
    masker: ComponentRef = Field(description="chooses the hidden tokens")
    target: ComponentRef = Field(description="what the decoder predicts")
    losses: list[LossRef] = Field(min_length=1, description="weighted loss terms, summed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="encoder/decoder sizes")
    data: DataConfig
    optim: OptimConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


# --- loading --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus '1e-3'-style numbers that YAML 1.1 would leave as strings."""
    value = yaml.safe_load(raw)
    return float(value) if isinstance(value, str) and _NUMBER.match(value) else value


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply 'a.b.c=value' to a nested dict; value is parsed as YAML ('1e-3' -> float, 'null' -> None)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError([(assignment, "override must look like dotted.key=value")], "command line")
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError([(key, f"{'.'.join(parts[:i]) or 'recipe'} is a list of {len(node)}; "
                                         f"{part!r} is not an index in it")], "command line")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last:
                node.setdefault(part, {})
        else:
            raise RecipeError([(key, f"{'.'.join(parts[:i])} is not a mapping")], "command line")
        if last:
            node[index] = parse_value(raw)
        else:
            node = node[index]


def read_recipe_tree(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([("recipe", f"file not found: {path}")], str(path))
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError([("recipe", f"not valid YAML: {err}")], str(path)) from err
    if not isinstance(tree, dict):
        raise RecipeError([("recipe", f"top level must be a mapping, got {type(tree).__name__}")], str(path))
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def _problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for item in err.errors():
        path = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        out.append((path or prefix or "recipe", item["msg"]))
    return out


def parse_recipe(tree: Any, source: str = "recipe") -> Recipe:
    """First pass: the schema. Raises RecipeError listing every problem with its field path."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_problems(err), source) from err


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    return parse_recipe(read_recipe_tree(path, overrides), str(path))


def component_refs(recipe: Recipe) -> list[tuple[str, str, ComponentRef]]:
    """(field path, kind, ref) for every component the recipe names."""
    refs = [("tokenizer", "tokenizer", recipe.tokenizer), ("masker", "masker", recipe.masker),
            ("target", "target", recipe.target), ("data.train", "dataset", recipe.data.train)]
    refs += [("data.eval", "dataset", recipe.data.eval)] if recipe.data.eval is not None else []
    refs += [(f"losses.{i}", "loss", ref) for i, ref in enumerate(recipe.losses)]
    return refs


def resolve_options(recipe: Recipe, registry) -> dict[str, BaseModel]:
    """Second pass: validate each component's options. Returns {field path: Options instance} and
    rewrites every ref's `options` with the complete, defaulted values (the resolved recipe)."""
    problems: list[tuple[str, str]] = []
    resolved: dict[str, BaseModel] = {}
    for path, kind, ref in component_refs(recipe):
        try:
            entry = registry.get(kind, ref.name)
        except PluginError as err:
            problems.append((f"{path}.name", str(err)))
            continue
        try:
            options = entry.cls.Options.model_validate(ref.options)
        except ValidationError as err:
            problems += _problems(err, f"{path}.options")
            continue
        resolved[path] = options
        ref.options = options.model_dump(mode="json")
    if problems:
        raise RecipeError(problems)
    return resolved


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
