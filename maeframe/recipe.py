"""The typed recipe: a tree (`recipe_file`: YAML and dotted overrides) -> pydantic `Recipe`, and component
option validation.

Validation runs in two passes. `load_recipe` checks the schema (unknown keys, types, ranges). `resolve`
then looks each component up in the registry and validates its `options` against that component's own
`Options`, so every error names its field path, e.g. `masker.options.ratio`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .errors import PluginError, RecipeError
from .recipe_base import SEED_RANGE, ComponentRef, LossRef, Seed, Strict  # noqa: F401 (re-exported)
from .recipe_file import flatten_tree, read_recipe_tree  # noqa: F401 (flatten_tree re-exported)
from .layout_fields import LayoutFields
from .recipe_joint import JOINT_FIELDS, MODALITY_NAME, ModalityConfig, check_joint, joint_refs
from .run_logger import spell_out_loggers


class ModelConfig(LayoutFields, Strict):
    embed_dim: int = Field(768, gt=0, description="encoder width")
    depth: int = Field(12, gt=0, description="encoder blocks")
    num_heads: int = Field(12, gt=0, description="encoder attention heads")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / embed_dim, encoder and decoder")
    decoder_embed_dim: int = Field(512, gt=0, description="decoder width")
    decoder_depth: int = Field(8, gt=0, description="decoder blocks")
    decoder_num_heads: int = Field(16, gt=0, description="decoder attention heads")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate of the last encoder block")
    decoder_attention: Literal["global", "local"] = Field(
        "global", description="decoder self-attention: global, or local shifted windows over a 2-D grid (AudioMAE)")
    decoder_window: tuple[int, int] = Field((4, 4), description="local attention window in tokens per grid axis")
    decoder_window_shift: tuple[int, int] | None = Field(
        None, description="shift of every other local block (null = half the window; AudioMAE uses [2, 0])")
    decoder_window_block: Literal["vit", "swin_v2"] = Field(
        "vit", description="local decoder blocks: vit (pre-norm, scaled dot-product attention in windows) or "
                           "swin_v2 (post-norm, scaled cosine attention with a learned temperature per head and "
                           "an MLP relative position bias: the blocks of AudioMAE's pretrained decoder)")
    activation_checkpointing: bool = Field(
        False, description="recompute each encoder/decoder block's activations in the backward pass: far less "
                           "activation memory (large models, big batches) for about one more forward of compute")
    modality_blocks: int = Field(0, ge=0, description="joint recipes: the first N of the `depth` encoder blocks are "
                                                      "per-modality (CAV-MAE: 11 of 12), the rest shared; 0 = all "
                                                      "shared (OmniMAE)")
    shared_patch_embed: bool = Field(False, description="joint recipes (alternate mixing): one patch embedding for "
                                                        "all modalities, whose patches must then have one size "
                                                        "(OmniMAE: images as 2-frame clips); false = one each")
    pooled_latent: Literal["none", "joint", "separate"] = Field(
        "none", description="joint recipes (paired mixing): also return each modality's pooled latent [B, D] for "
                            "cross-modal losses (`Prediction.pooled`): joint = mean of its tokens after the shared "
                            "blocks ran on all modalities together; separate = the shared blocks run again on this "
                            "modality's tokens alone (CAV-MAE's contrastive input); none = not computed")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        for dim, heads, prefix in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if dim % heads:
                raise ValueError(f"{prefix}embed_dim {dim} is not divisible by {prefix}num_heads {heads}")
        return self


class DataConfig(Strict):
    train: ComponentRef | None = Field(None, description="training dataset component (required, except in a joint "
                                                         "recipe with mixing: alternate, whose modalities name "
                                                         "their own data)")
    eval: ComponentRef | None = Field(None, description="held-out dataset for pictures, PSNR and kNN "
                                                        "(default: the training data without augmentation)")
    batch_size: int = Field(gt=0, description="samples per step on one device (before accumulation)")
    num_workers: int = Field(4, ge=0, description="DataLoader worker processes")
    pin_memory: bool = Field(True, description="page-locked host batches for faster copies to the GPU")
    persistent_workers: bool = Field(True, description="keep workers alive across epochs")
    prefetch_factor: int = Field(2, gt=0, description="batches each worker prepares ahead")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="unreadable samples are skipped and counted; "
                                                                  "above this fraction of samples seen the run stops")


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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compile is on: reduce-overhead replays the step's "
                               "kernels as CUDA graphs (static shapes), max-autotune also tunes matmul kernels")
    output_dir: str = Field("runs", description="runs are written to <output_dir>/<name>/")
    log_interval: int = Field(50, gt=0, description="steps between metric lines (the only host syncs)")
    checkpoint_interval: int = Field(20, gt=0, description="epochs between kept periodic checkpoints (the last epoch always gets one)")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="also refresh last.pt every N steps "
                                                                       "(bounds the work a crash can lose)")
    keep_checkpoints: int | None = Field(None, gt=0, description="keep only the newest N periodic checkpoints "
                                                                 "(null keeps all)")
    nonfinite: Literal["stop", "skip"] = Field("stop", description="a step with a non-finite loss or gradient "
                                                                  "is never applied; stop: end the run naming the step, "
                                                                  "skip: count it and go on")
    visualize_interval: int = Field(1, gt=0, description="epochs between reconstruction PNGs")
    visualize_samples: int = Field(8, gt=0, description="samples shown in each reconstruction PNG")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (smoke runs)")
    loggers: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="tensorboard")], description=(
        "experiment trackers that receive every metrics.jsonl line, the recipe, pictures and results (rank 0 "
        "only): names (tensorboard, mlflow, wandb, or a plugin's) or {name, options}; [] = metrics.jsonl "
        "alone. The older `tensorboard: true|false` still works without loggers: [tensorboard] or []"))
    progress_bar: bool = Field(True, description="show a progress bar on the terminal")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per process (null = torch's "
                                                        "default); 1 helps on small CPUs with loader workers")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp replicates the model on every "
                                                                "process (checkpoint last.pt); fsdp shards "
                                                                "parameters, gradients and AdamW state (FSDP2 "
                                                                "fully_shard, torch>=2.6; checkpoint last.dcp/; "
                                                                "pretrain and finetune); one process runs fsdp "
                                                                "unsharded")

    @model_validator(mode="before")
    @classmethod
    def _loggers(cls, data: Any) -> Any:
        return spell_out_loggers(data)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled step replays as CUDA graphs."""
        return self.compile and self.compile_mode == "reduce-overhead"

    @model_validator(mode="after")
    def _fsdp_precision(self) -> RuntimeConfig:
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("runtime.strategy fsdp runs in bf16 or fp32: fp16's grad scaler is not shard-aware "
                             "(set runtime.precision to bf16, fp32 or auto)")
        return self


class MonitorConfig(Strict):
    """Online k-NN monitor of a pretraining run (`maeframe/engine/monitor.py`): every few epochs, the frozen
    encoder's features of a fixed labelled subset vote as in the k-NN task; logged as monitor/knn_top1."""

    knn_every_epochs: int = Field(1, gt=0, description="epochs between evaluations (the last epoch is always one)")
    bank: int | None = Field(5000, gt=0, description="training images (no augmentation) in the feature bank: a "
                                                     "seeded random subset, at most the dataset; null = all")
    queries: int | None = Field(1000, gt=0, description="query images from data.eval (a seeded random subset, at "
                                                        "most the dataset; null = all); without data.eval, "
                                                        "training images outside the bank")
    k: int = Field(20, gt=0, description="neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="votes are weighted exp(cosine similarity / temperature)")
    pool: Literal["avg", "cls"] = Field("avg", description="feature: mean of the normalised patch tokens, or cls")
    batch_size: int | None = Field(None, gt=0, description="images per encoder forward (null = data.batch_size)")
    num_workers: int = Field(0, ge=0, description="DataLoader processes decoding the monitor's images")

    @field_validator("k")
    @classmethod
    def _fits_in_bank(cls, k: int, info: ValidationInfo) -> int:
        bank = info.data.get("bank")
        if bank is not None and k > bank:
            raise ValueError(f"{k} neighbours cannot vote from a bank of {bank} images (monitor.bank)")
        return k


class Recipe(Strict):
    task: Literal["pretrain"] = Field("pretrain", description="what the recipe runs")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run directory name")
    seed: Seed = Field(0, description="seeds model init, masks, data order and augmentation (torch's range: "
                                      "-2**63 to 2**64 - 1)")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import by name")
    tokenizer: ComponentRef | None = Field(None, description="turns samples into patches; fixes the token grid "
                                                             "(absent in a joint recipe: see modalities)")
    masker: ComponentRef | None = Field(None, description="chooses the hidden tokens (absent in a joint recipe)")
    target: ComponentRef | None = Field(None, description="what the decoder predicts (absent in a joint recipe)")
    losses: list[LossRef] | None = Field(None, min_length=1, description="weighted loss terms, summed (absent in a "
                                                                          "joint recipe)")
    modalities: dict[Annotated[str, Field(pattern=MODALITY_NAME)], ModalityConfig] | None = Field(
        None, description="joint pretraining: {modality name: its tokenizer, masker, target, losses, data, weight} "
                          "replacing the top-level tokenizer/masker/target/losses (maeframe/recipe_joint.py)")
    mixing: Literal["alternate", "paired"] | None = Field(
        None, description="joint recipes: alternate = each step trains one modality drawn by weight (OmniMAE); "
                          "paired = each sample holds every modality (CAV-MAE)")
    joint_losses: list[LossRef] | None = Field(None, description="mixing: paired: cross-modal loss terms "
                                                                 "(`CrossModalLoss`, e.g. a contrastive one), "
                                                                 "logged as loss/joint/<name>")
    model: ModelConfig = Field(default_factory=ModelConfig, description="encoder/decoder sizes")
    data: DataConfig
    optim: OptimConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    monitor: MonitorConfig | None = Field(None, description="online k-NN accuracy during pretraining; null = off")

    @model_validator(mode="after")
    def _graphs_fit(self) -> Recipe:
        _cuda_graphs_without_accumulation(self.runtime, self.optim)
        check_joint(self)
        return self


def _cuda_graphs_without_accumulation(runtime: RuntimeConfig, optim: OptimConfig | None) -> None:
    """CUDA graphs (compile_mode reduce-overhead) overwrite their outputs, the backward's gradients included,
    on every replay: gradients accumulated over several replays would be silently wrong (pytorch/pytorch#169545)."""
    if runtime.cuda_graphs and optim is not None and optim.accum_steps > 1:
        raise ValueError(f"runtime.compile_mode: reduce-overhead (CUDA graphs) reuses the gradients' memory on "
                         f"every replay, so it cannot accumulate optim.accum_steps={optim.accum_steps} micro-batches; "
                         f"set optim.accum_steps to 1 (a larger data.batch_size) or compile_mode to default")


# --- downstream evaluation recipes (task: finetune | linprobe | knn) --------------------------------

class EncoderConfig(Strict):
    """The encoder part of `ModelConfig`; it must match the checkpoint named in `init`."""

    embed_dim: int = Field(768, gt=0, description="encoder width")
    depth: int = Field(12, gt=0, description="encoder blocks")
    num_heads: int = Field(12, gt=0, description="encoder attention heads")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / embed_dim")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate of the last block (fine-tuning)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> EncoderConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        return self


class InitConfig(Strict):
    format: str = Field("maeframe", description="the weights' format, a registered weight format "
                                                "(`maeframe plugins --kind weight_format`): maeframe (a maeframe "
                                                "checkpoint, runs/NAME/last.pt), official_mae, official_videomae, "
                                                "official_audiomae (reference .pth files), hf, hf_videomae "
                                                "(Hugging Face transformers directories), ...; none: random "
                                                "initialisation (the baseline)")
    checkpoint: str | None = Field(None, description="path of the weights; only the encoder is used")
    modality: str | None = Field(None, description="a joint (multi-modality) maeframe checkpoint: the modality whose "
                                                   "patch embedding and per-modality blocks join the shared encoder "
                                                   "blocks; null = the one whose tokenizer equals this recipe's")

    @model_validator(mode="after")
    def _checkpoint_given(self) -> InitConfig:
        if self.format != "none" and not self.checkpoint:
            raise ValueError(f"format {self.format!r} needs a checkpoint path (or format: none)")
        return self


class HeadConfig(Strict):
    pool: Literal["avg", "cls"] = Field("avg", description="avg: mean of patch tokens + LayerNorm (fc_norm); "
                                                           "cls: the normalised cls token")
    num_classes: int | None = Field(None, gt=0, description="classes; null = len(dataset.classes)")
    multi_label: bool = Field(False, description="labels are multi-hot vectors: sigmoid + BCE, reported as mAP")
    init_std: float | None = Field(None, gt=0, description="trunc-normal std of the linear head "
                                                           "(null: 2e-5 fine-tuning, 0.01 linear probe, as MAE)")
    features: Literal["encoder", "pixels"] = Field("encoder", description="pixels: the baseline that skips the "
                                                                           "encoder and uses the flat input")


class DownstreamDataConfig(DataConfig):
    train: ComponentRef = Field(description="training dataset component")
    eval: ComponentRef = Field(description="held-out labelled dataset, evaluated after every epoch")


class AugmentConfig(Strict):
    mixup: float = Field(0.8, ge=0, description="mixup alpha (0 disables)")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha (0 disables)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch at all")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="probability of cutmix instead of mixup")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")
    rand_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment spec; null disables "
                                                                         "(works on 1- and 3-channel images)")
    random_erasing: float = Field(0.25, ge=0, le=1, description="probability of erasing a random box (pixel mode)")

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_parses(cls, spec: str | None) -> str | None:
        if spec is not None:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(spec, {})
            except Exception as err:  # timm raises AssertionError/ValueError/KeyError on a bad spec
                raise ValueError(f"{spec!r} is not a timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1): "
                                 f"{err or type(err).__name__}") from None
        return spec

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


class EmaConfig(Strict):
    decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimizer step")


class FinetuneOptimConfig(OptimConfig):
    base_lr: float = Field(1e-3, gt=0, description="lr = base_lr * effective_batch / 256")
    min_lr: float = Field(1e-6, ge=0, description="lr at the end of the cosine decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    layer_decay: float = Field(0.75, gt=0, le=1, description="lr scale layer_decay^(depth + 1 - layer id); 1 = off")


class LinprobeOptimConfig(OptimConfig):
    base_lr: float = Field(0.1, gt=0, description="LARS lr = base_lr * effective_batch / 256")
    weight_decay: float = Field(0.0, ge=0, description="LARS weight decay (MAE: 0)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="unused by LARS")
    momentum: float = Field(0.9, ge=0, lt=1, description="LARS momentum")


class KnnConfig(Strict):
    k: int = Field(20, gt=0, description="neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="votes are weighted exp(cosine similarity / temperature)")
    pool: Literal["avg", "cls"] = Field("avg", description="feature: mean of the normalised patch tokens, or cls")
    features: Literal["encoder", "pixels"] = Field("encoder", description="pixels: k-NN on the flat input")


class _DownstreamRecipe(Strict):
    task: str = Field(description="what the recipe runs")  # narrowed to one Literal by each subclass
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run directory name")
    seed: Seed = Field(0, description="seeds head init, data order, augmentation, mixup and drop path (torch's "
                                      "range)")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import by name")
    tokenizer: ComponentRef = Field(description="turns samples into patches; must match the pretraining patch size")
    model: EncoderConfig = Field(default_factory=EncoderConfig, description="encoder sizes (as pretrained)")
    init: InitConfig = Field(description="where the encoder weights come from")
    data: DownstreamDataConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _runtime_fits_the_task(self) -> _DownstreamRecipe:
        if self.runtime.strategy != "ddp" and self.task != "finetune":
            raise ValueError(f"runtime.strategy: a {self.task} run keeps its frozen encoder whole on every process "
                             f"(ddp); fsdp shards models that train (pretrain, finetune)")
        _cuda_graphs_without_accumulation(self.runtime, getattr(self, "optim", None))
        unused = [name for name in UNUSED_RUNTIME_FIELDS[self.task]
                  if getattr(self.runtime, name) != RuntimeConfig.model_fields[name].default]
        if unused:
            raise ValueError(f"runtime.{unused[0]}: a {self.task} run {UNUSED_REASON[self.task]}; leave "
                             f"{', '.join('runtime.' + n for n in unused)} at the default")
        return self


# runtime fields a downstream task has no use for: refused when set, never silently ignored
_PICTURES = ("visualize_interval", "visualize_samples")
UNUSED_RUNTIME_FIELDS = {
    "pretrain": (), "finetune": _PICTURES, "linprobe": _PICTURES,
    "knn": ("compile", "compile_mode", "log_interval", "checkpoint_interval", "checkpoint_every_steps",
            "keep_checkpoints", "nonfinite", "max_steps", *_PICTURES),
}
UNUSED_REASON = {"finetune": "draws no reconstructions", "linprobe": "draws no reconstructions",
                 "knn": "trains nothing (no steps, checkpoints or pictures)"}
UNUSED_RUNTIME_FIELDS["retrieval"], UNUSED_REASON["retrieval"] = UNUSED_RUNTIME_FIELDS["knn"], UNUSED_REASON["knn"]


class FinetuneRecipe(_DownstreamRecipe):
    task: Literal["finetune"] = Field(description="end-to-end fine-tuning of encoder + linear head")
    head: HeadConfig = Field(default_factory=HeadConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig
    ema: EmaConfig | None = Field(None, description="also keep and evaluate an EMA of the weights")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneRecipe:
        if self.augment.mixes and self.data.batch_size % 2:
            raise ValueError("data.batch_size: mixup/cutmix need an even batch size")
        if self.head.multi_label and not self.augment.mixes and self.augment.label_smoothing > 0:
            raise ValueError("augment.label_smoothing: multi-label targets are smoothed only while mixing "
                             "(mixup > 0); set label_smoothing: 0 or enable mixup")
        if self.head.features != "encoder":
            raise ValueError("head.features: fine-tuning trains an encoder; pixels is for linprobe and knn")
        if self.ema is not None and self.runtime.strategy == "fsdp":
            raise ValueError("ema: an EMA copy of a sharded (fsdp) model is not supported; use runtime.strategy: "
                             "ddp or ema: null")
        return self


def _pixels_without_init(features: str, field: str, init: InitConfig) -> None:
    if features == "pixels" and init.format != "none":
        raise ValueError(f"{field}: the pixel baseline uses no encoder; set init.format: none")


class LinprobeRecipe(_DownstreamRecipe):
    task: Literal["linprobe"] = Field(description="frozen encoder, BatchNorm + linear head trained with LARS")
    head: HeadConfig = Field(default_factory=lambda: HeadConfig(pool="cls"))
    optim: LinprobeOptimConfig

    @model_validator(mode="after")
    def _consistent(self) -> LinprobeRecipe:
        _pixels_without_init(self.head.features, "head.features", self.init)
        return self


class KnnRecipe(_DownstreamRecipe):
    task: Literal["knn"] = Field(description="weighted k-NN on frozen features, no training")
    knn: KnnConfig = Field(default_factory=KnnConfig)

    @model_validator(mode="after")
    def _consistent(self) -> KnnRecipe:
        _pixels_without_init(self.knn.features, "knn.features", self.init)
        return self


from .recipe_retrieval import RetrievalRecipe  # noqa: E402 (it builds on the configs above)
DOWNSTREAM_TYPES = (FinetuneRecipe, LinprobeRecipe, KnnRecipe, RetrievalRecipe)
RECIPE_TYPES = (Recipe, *DOWNSTREAM_TYPES)
TASKS = ("pretrain", "finetune", "linprobe", "knn", "retrieval")


def _task_of(value: Any) -> str | None:
    task = value.get("task", "pretrain") if isinstance(value, dict) else getattr(value, "task", None)
    return task if isinstance(task, str) else None


AnyRecipe = Annotated[
    Union[Annotated[Recipe, Tag("pretrain")], Annotated[FinetuneRecipe, Tag("finetune")],
          Annotated[LinprobeRecipe, Tag("linprobe")], Annotated[KnnRecipe, Tag("knn")],
          Annotated[RetrievalRecipe, Tag("retrieval")]],
    Discriminator(_task_of, custom_error_type="unknown_task",
                  custom_error_message=f"task must be one of {', '.join(TASKS)}"),
]
"""Any recipe, discriminated on `task` (absent = pretrain). `Recipe` itself stays the pretraining recipe."""
RECIPE_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyRecipe)


_FIELD_MESSAGE = re.compile(r"^Value error, ([A-Za-z_]\w*(?:\.\w+)+|" + "|".join(JOINT_FIELDS) + r"): (.*)$", re.S)


def _problems(err: ValidationError, prefix: str = "", tags: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(field path, message) per error; a leading union tag in `tags` (the task) is not part of the path."""
    out = []
    for item in err.errors():
        loc, message = item["loc"][1:] if item["loc"][:1] and item["loc"][0] in tags else item["loc"], item["msg"]
        if item["type"] == "unknown_task":
            loc = ("task",)
        elif item["type"] == "value_error" and (named := _FIELD_MESSAGE.match(message)) and \
                named[1].split(".")[:len(loc)] == [str(part) for part in loc]:
            loc, message = tuple(named[1].split(".")), named[2]  # a check naming its field (at or below loc)
        path = ".".join(str(p) for p in (prefix, *loc) if p != "")
        out.append((path or prefix or "recipe", message))
    return out


def parse_recipe(tree: Any, source: str = "recipe") -> AnyRecipe:
    """First pass: the schema, chosen by `task`. Raises RecipeError listing every problem with its field path."""
    try:
        return RECIPE_ADAPTER.validate_python(tree)
    except ValidationError as err:
        raise RecipeError(_problems(err, tags=TASKS), source) from err


def load_recipe(path: str | Path, overrides: list[str] = ()) -> AnyRecipe:
    return parse_recipe(read_recipe_tree(path, overrides), str(path))


def component_refs(recipe: AnyRecipe) -> list[tuple[str, str, ComponentRef]]:
    """(field path, kind, ref) for every component the recipe names (downstream recipes have no masker,
    target or losses)."""
    refs = [("tokenizer", "tokenizer", recipe.tokenizer)] if getattr(recipe, "tokenizer", None) is not None else []
    refs += [(kind, kind, getattr(recipe, kind)) for kind in ("masker", "target") if getattr(recipe, kind, None)]
    refs += [("data.train", "dataset", recipe.data.train)] if recipe.data.train is not None else []
    refs += [("data.eval", "dataset", recipe.data.eval)] if recipe.data.eval is not None else []
    refs += [(f"losses.{i}", "loss", ref) for i, ref in enumerate(getattr(recipe, "losses", None) or [])]
    refs += [(f"runtime.loggers.{i}", "logger", ref) for i, ref in enumerate(recipe.runtime.loggers)]
    return refs + joint_refs(recipe)


def resolve_options(recipe: AnyRecipe, registry) -> dict[str, BaseModel]:
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


def dump_recipe(recipe: AnyRecipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
