"""`maeframe reconstruct`: a pretrained masked autoencoder on a user's own files.

Each input is read with the weights' evaluation preprocessing (`engine/files.py`), masked (the recipe's
masker or another one, drawn from `seed`, or an explicit mask file), encoded and decoded one at a time;
its masked-region loss is the recipe's weighted loss terms exactly as training computes them
(`engine/step.py mae_losses`), and its pictures are the training run's reconstruction panels drawn by the
tokenizer (`Tokenizer.save_pictures` with `playable`: PNG, GIF for video, spectrogram PNG and Griffin-Lim WAVs
for audio).
`reconstruct.json` lists per input the loss, its terms, the mask ratio and the files written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import MaeframeError
from ..masker import Mask
from .files import files_dataset, load_sample
from .mask_file import read_mask_file
from .pretrained import load_autoencoder, open_weights, prepare_tree, restore_component_states
from .step import mae_losses
from .visualize import reconstruction_panels


@dataclass
class Reconstruction:
    """One input. sample [*input_shape] (normalised, as the model saw it); masked [N] float, 1 = hidden;
    prediction [N, out_dim] (the decoder's output in the target's space); panels [4, *input_shape] in [0, 1]
    or None (a target without a picture); loss: the recipe's weighted total; terms: {label: value or None
    when a term cannot be computed on one sample}; files: what was written for it."""

    path: str
    sample: Tensor
    masked: Tensor
    prediction: Tensor
    panels: Tensor | None
    loss: float | None
    terms: dict[str, float | None]
    mask_ratio: float
    files: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"input": self.path, "loss": self.loss, "loss_terms": self.terms, "mask_ratio": self.mask_ratio,
                "hidden_tokens": int(self.masked.sum()), "files": self.files}


def masker_tree(tree: dict[str, Any], masker: str | None, masker_options: dict[str, Any] | None,
                mask_ratio: float | None) -> bool:
    """Apply --masker / --masker-option / --mask-ratio to the recipe tree; True when the masker changed."""
    if masker is not None:
        tree["masker"] = {"name": masker, "options": dict(masker_options or {})}
    elif masker_options:
        tree["masker"]["options"] = {**tree["masker"].get("options", {}), **masker_options}
    if mask_ratio is not None:
        tree["masker"].setdefault("options", {})["ratio"] = mask_ratio
    return masker is not None or bool(masker_options) or mask_ratio is not None


@torch.no_grad()
def reconstruct(weights: str | Path, inputs: list[str | Path], out: str | Path | None = None, *,
                format: str = "auto", mask_ratio: float | None = None, masker: str | None = None,
                masker_options: dict[str, Any] | None = None, seed: int = 0, mask_file: str | Path | None = None,
                overrides: list[str] = (), device: str | torch.device = "cpu") -> list[Reconstruction]:
    """Reconstruct each input file with the weights; with `out`, write the pictures and reconstruct.json
    there. Returns one `Reconstruction` per input, in order. Errors (a missing or unreadable input, weights
    that do not fit, a mask file of the wrong size) are `MaeframeError`s / `FileNotFoundError`s naming the file."""
    if mask_file is not None and (masker is not None or mask_ratio is not None or masker_options):
        raise MaeframeError("--mask-file gives the mask itself: leave out --masker, --masker-option and --mask-ratio")
    opened = open_weights(weights, format)
    if opened.task != "pretrain":
        raise MaeframeError(f"{opened.path}: a {opened.task} checkpoint holds no decoder; reconstruction needs "
                            f"pretraining weights")
    tree = opened.tree
    changed = masker_tree(tree, masker, masker_options, mask_ratio)
    prepared = prepare_tree(opened, tree, list(overrides))
    paths = [str(path) for path in inputs]
    dataset, reader = files_dataset(prepared, paths)
    model = load_autoencoder(opened, prepared).to(device)
    restore_component_states(opened, prepared, changed)
    components = prepared.components
    tokenizer, spec = components.tokenizer, components.tokenizer.spec
    device = torch.device(device)
    if mask_file is not None:
        hidden = read_mask_file(mask_file, spec.grid, len(paths))
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            hidden = components.masker(len(paths), device).masked.cpu() > 0
    results = []
    for i, path in enumerate(paths):
        sample = load_sample(dataset, i)[0]
        mask = Mask.from_bool(hidden[i:i + 1].to(device))
        tokens = tokenizer.tokenize(sample[None].to(device))
        prediction = model(tokens.patches, mask)
        try:
            total, terms, target = mae_losses(components, tokens, mask, prediction)
            values: dict[str, float | None] = {label: float(term) for label, term in terms.items()}
            loss: float | None = float(total)
        except ValueError:  # a term that needs more than one sample (batch statistics): computed alone
            target, loss, values = components.target(tokens, mask), None, {}
            for label, _, term in components.losses:
                try:
                    values[label] = float(term(prediction, target, mask))
                except ValueError:
                    values[label] = None
        panels = reconstruction_panels(components, dataset, tokens, mask, prediction, target)
        results.append(Reconstruction(path, sample, mask.masked[0].cpu(), prediction.values[0].float().cpu(),
                                      None if panels is None else panels[0].cpu(), loss, values,
                                      float(mask.masked.mean())))
    if out is not None:
        write_outputs(Path(out), results, tokenizer, {
            "weights": str(opened.path), "format": opened.format, "reader": reader, "seed": seed,
            "masker": None if mask_file is not None else tree["masker"],
            "mask_file": None if mask_file is None else str(mask_file), "grid": list(spec.grid),
            "losses": [{"label": label, "weight": weight} for label, weight, _ in components.losses]})
    return results


def write_outputs(out: Path, results: list[Reconstruction], tokenizer, facts: dict[str, Any]) -> Path:
    """Pictures (drawn into a temporary folder, then renamed into `out`) and reconstruct.json (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reconstruct.", dir=out))
    try:
        for i, result in enumerate(results):
            if result.panels is None:
                continue
            mask = Mask.from_bool(result.masked[None] > 0)
            drawn = tokenizer.save_pictures(result.panels[None], staging / f"{i:03d}-{Path(result.path).stem}.png", mask,
                                            playable=True)
            for file in drawn:
                os.replace(file, out / Path(file).name)
                result.files.append(str(out / Path(file).name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = {**facts, "inputs": [result.record() for result in results]}
    path = out / "reconstruct.json"
    tmp = out / ".reconstruct.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path
