"""Export a maeframe checkpoint as a Hugging Face transformers directory (config.json + model.safetensors).

A pretraining checkpoint becomes `ViTMAEForPreTraining` (encoder and decoder: the same latent, predictions
and loss for the same noise); with `encoder_only`, any checkpoint's encoder becomes `ViTModel`. Only what
transformers computes exactly is written; everything else is refused with the reason:
* a checkpoint that is not a 2-D grid with cls token and per-axis sin-cos positions goes to the weight
  formats' `to_transformers` (e.g. `hf_videomae`: video trained in VideoMAE's layout, `model.cls_token:
  false`, `model.positions: flat`, becomes VideoMAEForPreTraining / VideoMAEModel); refused if none takes it;
* for the decoder: non-square grids or patches (ViTMAE's loss patchifies square images only), a target whose
  values are not the input patches (`Target.patch_values`), norm_pix with an eps other than ViTMAE's 1e-6,
  or local decoder attention.
The directory is written next to its destination and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ..engine.checkpoint import load_checkpoint
from ..weights import EncoderLayout
from .hf import official_to_hf, vit_config, vitmae_config
from .official_mae import InteropError, maeframe_to_official

HF_EPS = 1e-6  # the constant ViTMAEForPreTraining adds to the per-patch variance (norm_pix_loss)


@dataclass(frozen=True)
class HFExport:
    """An exported directory and the transformers class that loads it with no missing or unexpected key."""

    path: Path
    architecture: str  # "ViTMAEForPreTraining" or "ViTModel"

    def load_call(self) -> str:
        extra = ", add_pooling_layer=False" if self.architecture == "ViTModel" else ""
        return f"transformers.{self.architecture}.from_pretrained({str(self.path)!r}{extra})"


def _decoder_problem(recipe, spec, target) -> str | None:
    """Why ViTMAEForPreTraining cannot compute this checkpoint's decoder and loss (None: it can)."""
    values = target.patch_values if target is not None else None
    if len(set(spec.grid)) != 1 or len(set(spec.patch_size)) != 1:
        return (f"ViTMAEForPreTraining's loss patchifies square images with square patches; this grid is "
                f"{spec.grid} with patches {spec.patch_size}")
    if values is None or target.out_dim != spec.patch_dim:
        return (f"the decoder predicts target {recipe.target.name!r}, not the input patches ViTMAEForPreTraining "
                f"reconstructs")
    if values.norm_pix and values.eps != HF_EPS:
        return f"norm_pix eps is {values.eps}, ViTMAE's norm_pix_loss uses {HF_EPS}"
    if recipe.model.decoder_attention != "global":
        return "the decoder uses local (windowed) attention; ViTMAE's decoder attends globally"
    return None


def _mask_ratio(masker, num_tokens: int) -> float:
    """A ViTMAE mask_ratio that keeps as many tokens visible as the recipe's masker, int(N · (1 - ratio)) ==
    visible: the largest with 2 decimals (else 3, ...), e.g. 0.75 for 4 of 16 and for 12 of 49; 0.75 when the
    masker's count is not fixed (transformers only uses it when no noise is given)."""
    visible = masker.visible_tokens() if masker is not None else None
    if visible is None:
        return 0.75
    for digits in range(2, 10):
        ratio = math.floor((1 - visible / num_tokens) * 10 ** digits) / 10 ** digits
        if int(num_tokens * (1 - ratio)) == visible:
            return ratio
    raise InteropError(f"no mask_ratio keeps {visible} of {num_tokens} tokens visible")  # 9 decimals always do


def export_hf(checkpoint_path: str | Path, output_dir: str | Path, encoder_only: bool = False) -> HFExport:
    """maeframe checkpoint -> <output_dir>/{config.json, model.safetensors} (see the module docstring)."""
    from ..build import prepare
    from ..recipe import RECIPE_ADAPTER

    source, output = Path(checkpoint_path), Path(output_dir)
    try:
        state = load_checkpoint(source)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch.load / DCP raise many types for foreign files
        detail = str(err) if str(source) in str(err) else f"{source}: {err}"
        raise InteropError(f"{detail}; `--format hf` exports maeframe checkpoints (runs/NAME/last.pt)") from None
    recipe = RECIPE_ADAPTER.validate_python(state["recipe"])
    prepared = prepare(recipe)
    components = prepared.components
    spec = components.tokenizer.spec
    model = state["model"]
    layout = _trained_layout(prepared, source)
    if len(spec.grid) != 2 or layout != EncoderLayout():
        return _export_by_format(prepared, model, layout, source, output, encoder_only)
    if not any(k.startswith("encoder.") for k in model) or "encoder.cls_token" not in model:
        raise InteropError(f"{source}: holds no maeframe encoder with a cls token (a k-NN or pixel-feature run?)")
    problem = None
    if not encoder_only:
        problem = (f"it is a {state.get('task', 'downstream')} checkpoint without a decoder"
                   if not any(k.startswith("decoder.") for k in model) else
                   _decoder_problem(recipe, spec, components.target))
    if problem:
        raise InteropError(f"{source}: cannot be exported as ViTMAEForPreTraining: {problem}; pass --encoder-only "
                           f"to export the encoder as ViTModel")
    if "encoder.norm.weight" not in model:
        raise InteropError(f"{source}: its encoder has no final norm (average pooling replaced it by fc_norm), "
                           f"while transformers' ViTModel always applies one; export the pretraining checkpoint "
                           f"it was fine-tuned from, or fine-tune with head.pool: cls")
    wanted = ("encoder.",) if encoder_only else ("encoder.", "decoder.")
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.items()
               if k.startswith(wanted) and k not in ("encoder.pos_embed", "decoder.pos_embed")}
    unused = [k for k in weights if k.startswith("encoder.") and not k.startswith(
        ("encoder.patch_embed.", "encoder.cls_token", "encoder.blocks.", "encoder.norm."))]
    if unused:
        raise InteropError(f"{source}: encoder tensors with no ViT counterpart: {unused[:4]}")
    config = model_config(recipe, spec, components, weights, encoder_only)
    tensors = official_to_hf(maeframe_to_official(weights, spec), "" if encoder_only else "vit.")
    _write_directory(output, config, tensors, source)
    return HFExport(output, config["architectures"][0])


def _trained_layout(prepared, source: Path) -> EncoderLayout:
    """The layout the checkpoint trained in (a downstream run's: that of the weights it started from)."""
    entry = prepared.registry.get("weight_format", "maeframe")
    try:
        return entry.cls(entry.cls.Options()).layout_for(source)
    except FileNotFoundError as err:
        raise InteropError(str(err)) from None


def _export_by_format(prepared, model: dict, layout: EncoderLayout, source: Path, output: Path,
                      encoder_only: bool) -> HFExport:
    """A checkpoint that is not a 2-D ViT with cls token and per-axis sin-cos: written by the weight format
    whose `to_transformers` takes it (e.g. `hf_videomae` for video in VideoMAE's layout), else refused."""
    for name, entry in prepared.registry.entries["weight_format"].items():
        try:
            written = entry.cls(entry.cls.Options()).to_transformers(model, prepared, layout, encoder_only)
        except InteropError as err:
            raise InteropError(f"{source}: {err}") from None
        if written is not None:
            config, tensors = written
            _write_directory(output, config, tensors, source)
            return HFExport(output, config["architectures"][0])
    grid = prepared.components.tokenizer.spec.grid
    raise InteropError(f"{source}: no transformers class computes this encoder (token grid {grid}, "
                       f"{'a' if layout.cls_token else 'no'} cls token, "
                       f"{'per-axis sin-cos' if layout.positions is None else 'its own'} positions): ViT/ViTMAE "
                       f"need a 2-D grid with cls token and per-axis sin-cos (model.cls_token: true, "
                       f"model.positions: axes), and no installed weight format writes this kind "
                       f"(`maeframe plugins --kind weight_format`)")


def model_config(recipe, spec, components, weights, encoder_only: bool) -> dict:
    """config.json for the recipe's encoder (and decoder unless `encoder_only`)."""
    m = recipe.model
    (gh, gw), (p, _) = spec.grid, spec.patch_size
    depth = len({k.split(".")[2] for k in weights if k.startswith("encoder.blocks.")})
    encoder = vit_config(width=weights["encoder.cls_token"].shape[-1], depth=depth, heads=m.num_heads,
                         mlp_ratio=m.mlp_ratio, image_size=(gh * p, gw * p), patch_size=p, channels=spec.channels)
    if encoder_only:
        return {"architectures": ["ViTModel"], "model_type": "vit", **encoder}
    values = components.target.patch_values
    return vitmae_config(encoder, width=m.decoder_embed_dim, depth=m.decoder_depth, heads=m.decoder_num_heads,
                         mlp_ratio=m.mlp_ratio, mask_ratio=_mask_ratio(components.masker, spec.num_tokens),
                         norm_pix_loss=values.norm_pix)


def _write_directory(output: Path, config: dict, tensors: dict, source: Path) -> None:
    """config.json and model.safetensors into a temporary sibling directory, then renamed to `output` (an
    existing output directory is replaced only once the new one is complete)."""
    if output.exists() and not output.is_dir():
        raise InteropError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "source": source.name})
        for item, mode in ((tmp, 0o777), (tmp / "config.json", 0o666), (tmp / "model.safetensors", 0o666)):
            item.chmod(mode & ~umask)  # mkdtemp makes the directory private; give it the usual permissions
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
