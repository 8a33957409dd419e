"""The built-in weight formats of `init.format`: maeframe checkpoints and the reference MAE, VideoMAE and
AudioMAE weights, registered through `register_weight_formats` as any third-party format would be."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_STD
from torch import Tensor

from maeframe import EncoderLayout, WeightFormat, component_class, hookimpl, recipe_layout
from maeframe.interop import InteropError, checkpoint_entry, infer_config, load_checkpoint, official_to_maeframe, read_official

from .official_av import (audiomae_autoencoder_to_maeframe, audiomae_to_maeframe, read_reference, videomae_decoder_to_maeframe, videomae_positions,
                          videomae_to_maeframe)

ARCHITECTURE = ("embed_dim", "depth", "num_heads", "mlp_ratio")
AUDIOMAE_MEL_BINS = 128  # AudioMAE's fbank height; the stored positions then give the time length
AUDIOMAE_DECODER_HEADS = 16  # models_mae.py: decoder_num_heads=16, and num_heads=16 in its Swin decoder blocks
# decoder_mode=1 (the released pretraining): Swin V2 blocks, 4×4 windows, every other block shifted by (2, 0)
AUDIOMAE_LOCAL_DECODER = {"decoder_attention": "local", "decoder_window": [4, 4], "decoder_window_shift": [2, 0],
                          "decoder_window_block": "swin_v2"}
# VideoMAE's released models (modeling_pretrain.py): encoder / decoder width -> heads
VIDEOMAE_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
VIDEOMAE_DECODER_HEADS = {192: 3, 384: 6, 512: 8, 640: 8}
VIDEOMAE_CLIP = {"num_frames": 16, "image_size": 224}  # run_mae_pretraining.py's num_frames and input_size


def heads_for(width: int, table: dict[int, int]) -> int:
    """The released models' head count of a width, else 64-wide heads (1 head when that does not divide)."""
    heads = table.get(width, max(1, width // 64))
    return heads if width % heads == 0 else 1


def count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


def check_recorded_architecture(recipe: dict[str, Any], path: Path, model: EncoderConfig | None,
                                 tokenizer_options: dict | None) -> None:
    """num_heads is not visible in the weights' shapes, so compare with what the checkpoint's run recorded."""
    recorded = recipe.get("model", {})
    problems = [f"model.{key}: the checkpoint's encoder has {recorded[key]!r}, the recipe {getattr(model, key)!r}"
                for key in ARCHITECTURE if model is not None and key in recorded and recorded[key] != getattr(model, key)]
    theirs = (recipe.get("tokenizer") or {}).get("options", {})  # a joint recipe's tokenizers are per modality
    for key in ("patch_size", "channels"):
        if tokenizer_options and key in theirs and key in tokenizer_options and theirs[key] != tokenizer_options[key]:
            problems.append(f"tokenizer.options.{key}: the checkpoint was pretrained with {theirs[key]!r}, "
                            f"the recipe has {tokenizer_options[key]!r}")
    if problems:
        raise InteropError(f"{path}: " + "; ".join(problems))


class MaeframeWeights(WeightFormat):
    """A maeframe checkpoint (runs/NAME/last.pt of pretraining or of a downstream run, or an fsdp run's
    last.dcp/): its "model" entry's `encoder.*` tensors; the architecture it recorded must match the recipe."""

    reads_directories = True

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            raise InteropError(f"init.checkpoint: {err}; for reference weights set init.format: official_mae") from None
        check_recorded_architecture(state.get("recipe", {}), path, model, tokenizer_options)
        return state["model"]

    def layout_for(self, path: Path) -> EncoderLayout:
        """The layout the checkpoint's run trained in: a pretraining recipe's `model.cls_token` /
        `model.positions`; a downstream run's is that of the weights it started from (its recorded `init`)."""
        recipe = self.recipe_for(path)
        if recipe.get("task", "pretrain") == "pretrain":
            return recipe_layout(recipe.get("model", {}))
        init = recipe.get("init", {})
        name = init.get("format", "maeframe")
        if name == "none":
            return EncoderLayout()
        cls = component_class("weight_format", name)
        try:
            return cls(cls.Options()).layout_for(Path(init["checkpoint"]))
        except (FileNotFoundError, InteropError) as err:
            raise InteropError(f"{path}: the layout of a downstream checkpoint is that of the weights its run "
                               f"started from (init.checkpoint {init['checkpoint']!r}), which cannot be read: "
                               f"{err}") from None

    def recipe_for(self, path: Path) -> dict[str, Any]:
        """The recipe the checkpoint's run recorded (a pretraining or a downstream one)."""
        try:
            return checkpoint_entry(path, "recipe")
        except ValueError as err:
            raise InteropError(str(err)) from None


class OfficialMAEWeights(WeightFormat):
    """Reference MAE weights (`mae_pretrain_vit_base.pth`, or a fine-tuned one: its classifier is ignored)."""

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        raw = read_official(path)
        raw = {k: v for k, v in raw.items() if not k.startswith(("head.", "fc_norm."))}
        rows = raw["pos_embed"].shape[1] - 1 if "pos_embed" in raw else None
        try:
            weights, _ = official_to_maeframe(raw, spec.grid if rows == math.prod(spec.grid) else None)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None
        return weights

    def recipe_for(self, path: Path) -> dict[str, Any]:
        """MAE's own pretraining: sizes from the tensors (`infer_config`; heads from the standard ViT table),
        random masking at 0.75, normalised-pixel MSE (the released models' norm_pix_loss), ImageNet
        normalisation of images read by `image_files` (its root is a placeholder)."""
        try:
            config, patch, channels, grid = infer_config(read_official(path))
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None
        size = [g * p for g, p in zip(grid, patch if isinstance(patch, tuple) else (patch, patch))]
        return {
            "task": "pretrain", "name": Path(path).stem or "official_mae",
            "tokenizer": {"name": "image_patch", "options": {"image_size": size, "patch_size": patch,
                                                             "channels": channels}},
            "masker": {"name": "random", "options": {"ratio": 0.75}},
            "target": {"name": "pixel", "options": {"norm_pix": True}},
            "losses": [{"name": "mse", "weight": 1.0}],
            "model": config,
            "data": {"train": {"name": "image_files", "options": {"root": "."}}, "batch_size": 1},
            "optim": {"epochs": 1},  # required by the schema; nothing is trained
        }


class OfficialVideoMAEWeights(WeightFormat):
    """Reference VideoMAE weights (pretraining or fine-tuned): an encoder without cls token whose positions
    are VideoMAE's 1-D sinusoid table over the token index."""

    @property
    def layout(self) -> EncoderLayout:
        return EncoderLayout(cls_token=False, positions=videomae_positions)

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            return videomae_to_maeframe(read_reference(path), spec.num_tokens)
        except InteropError as err:
            raise InteropError(f"init.checkpoint {path}: {err}") from None

    def read_autoencoder(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        """Encoder and, for pretraining weights, the decoder (`videomae_decoder_to_maeframe`)."""
        state = read_reference(path)
        try:
            return {**videomae_to_maeframe(state, spec.num_tokens), **videomae_decoder_to_maeframe(state, spec.num_tokens)}
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None

    def recipe_for(self, path: Path) -> dict[str, Any]:
        """VideoMAE's pretraining: sizes from the tensors (heads from the released models' table), 16 frames of
        224² in tubelets of the stored kernel (2×16×16), tube masking 0.9 (the released Kinetics / SSv2 models),
        ImageNet normalisation (`video_folder`'s defaults, short side 224 then a centre crop; its root is a
        placeholder) and VideoMAE's normalised-pixel target: per tubelet and channel, (x - mean) / (unbiased
        std + eps). VideoMAE takes those statistics on [0, 1] pixels with eps 1e-6 and maeframe on pixels
        normalised by the channel's std s_c, where eps 1e-6 / s_c gives the same values."""
        state = read_reference(path)
        prefix = "encoder." if "encoder.patch_embed.proj.weight" in state else ""
        weight = state.get(prefix + "patch_embed.proj.weight")
        if weight is None or weight.dim() != 5:
            raise InteropError(f"{path}: no patch_embed.proj.weight [D, C, t, p, q]: not VideoMAE weights")
        width, channels, tubelet, p, q = weight.shape
        model = {"embed_dim": width, "depth": count_blocks(state, prefix + "blocks."),
                 "num_heads": heads_for(width, VIDEOMAE_HEADS),
                 "mlp_ratio": state[prefix + "blocks.0.mlp.fc1.weight"].shape[0] / width}
        if "encoder_to_decoder.weight" in state:
            decoder = state["encoder_to_decoder.weight"].shape[0]
            model.update(decoder_embed_dim=decoder, decoder_depth=count_blocks(state, "decoder.blocks."),
                         decoder_num_heads=heads_for(decoder, VIDEOMAE_DECODER_HEADS))
        return {
            "task": "pretrain", "name": Path(path).stem or "official_videomae",
            "tokenizer": {"name": "video_tube", "options": {**VIDEOMAE_CLIP, "patch_size": [p, q], "tubelet": tubelet,
                                                            "channels": channels}},
            "masker": {"name": "tube", "options": {"ratio": 0.9}},
            "target": {"name": "pixel", "options": {"norm_pix": True, "norm_over": "channel", "eps_after_sqrt": True,
                                                    "eps": [1e-6 / s for s in IMAGENET_DEFAULT_STD]}},
            "losses": [{"name": "mse", "weight": 1.0}],
            "model": model,
            "data": {"train": {"name": "video_folder", "options": {"root": ".", "short_side": VIDEOMAE_CLIP["image_size"]}},
                     "batch_size": 1},
            "optim": {"epochs": 1},  # required by the schema; nothing is trained
        }


class OfficialAudioMAEWeights(WeightFormat):
    """Reference AudioMAE weights (pretraining or fine-tuned) on the recipe's (time, frequency) grid."""

    def recipe_for(self, path: Path) -> dict[str, Any]:
        """AudioMAE's pretraining setting: sizes from the tensors (encoder heads = width / 64, decoder heads 16 as
        AudioMAE), AudioMAE's 128 mel bins (the time length follows from the stored positions: 1024 frames for
        the released models), random masking 0.8, norm_pix MSE, AudioSet fbank statistics (`audio_folder`'s
        defaults; its root is a placeholder). A decoder of Swin V2 blocks (`decoder_mode=1`, recognised by
        their `attn.tau`) runs as local attention in 4×4 windows shifted by (2, 0) in every other block
        (AudioMAE's default; weights trained with its `no_shift` need `--set model.decoder_window_shift=[0,0]`);
        another decoder as global attention."""
        state = read_reference(path)
        weight, positions = state.get("patch_embed.proj.weight"), state.get("pos_embed")
        if weight is None or weight.dim() != 4 or positions is None:
            raise InteropError(f"{path}: no patch_embed.proj.weight [D, 1, pt, pf] and pos_embed: not AudioMAE weights")
        width, _, pt, pf = weight.shape
        mel_bins = AUDIOMAE_MEL_BINS
        frames = (positions.shape[1] - 1) // (mel_bins // pf) * pt
        depth = count_blocks(state, "blocks.")
        model = {"embed_dim": width, "depth": depth, "num_heads": max(1, width // 64),
                 "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width}
        if "decoder_embed.weight" in state:
            decoder = state["decoder_embed.weight"].shape[0]
            model.update(decoder_embed_dim=decoder, decoder_depth=count_blocks(state, "decoder_blocks."),
                         decoder_num_heads=heads_for(decoder, {decoder: AUDIOMAE_DECODER_HEADS}))
            if "decoder_blocks.0.attn.tau" in state:
                model.update(AUDIOMAE_LOCAL_DECODER)
        return {
            "task": "pretrain", "name": Path(path).stem or "official_audiomae",
            "tokenizer": {"name": "spectrogram", "options": {"target_length": frames, "num_mel_bins": mel_bins,
                                                             "patch_size": [pt, pf]}},
            "masker": {"name": "random", "options": {"ratio": 0.8}},
            "target": {"name": "pixel", "options": {"norm_pix": True}},
            "losses": [{"name": "mse", "weight": 1.0}],
            "model": model,
            "data": {"train": {"name": "audio_folder", "options": {"root": "."}}, "batch_size": 1},
            "optim": {"epochs": 1},  # required by the schema; nothing is trained
        }

    def read(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        try:
            return audiomae_to_maeframe(read_reference(path), spec.grid)
        except InteropError as err:
            raise InteropError(f"init.checkpoint {path}: {err}") from None

    def read_autoencoder(self, path: Path, spec, model, tokenizer_options: dict[str, Any]) -> dict[str, Tensor]:
        """Encoder and, for pretraining weights, the decoder (`audiomae_autoencoder_to_maeframe`)."""
        state = read_reference(path)
        try:
            return audiomae_autoencoder_to_maeframe(state, spec.grid)
        except InteropError as err:
            raise InteropError(f"{path}: {err}") from None


@hookimpl
def register_weight_formats(register):
    register("maeframe", MaeframeWeights)
    register("official_mae", OfficialMAEWeights)
    register("official_videomae", OfficialVideoMAEWeights)
    register("official_audiomae", OfficialAudioMAEWeights)
