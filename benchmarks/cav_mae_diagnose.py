"""Why does CAV-MAE's contrastive term stay at log(B) on the spoken letters? Three checks of the CPU recipe's model
(recipes/cav_mae_klettres.yaml) with the real tokenizers, maskers and data:

  (a) gradients of the contrastive term alone reach each modality's patch embedding and own blocks;
  (b) row alignment: for every training recording i, the label of its audio side is the letter drawn for its
      visual side (the loader's default collate stacks both sides of sample i into row i; masks and
      tokenizers act per row);
  (c) contrastive-only training (AdamW, weight decay 0, absolute lr `--lr`) on a fixed subset of `--pairs`
      training pairs (random, or the first ones with `--first`) for `--steps` full-batch steps, fresh masks
      each step (or none): InfoNCE and audio->visual R@1 over the pairs with every token visible, before and
      after, for each of `--variants` (<modality_blocks or recipe>:<masked or visible>[:<recipe override>...];
      0 modality blocks = pooled latents of the patch embeddings through the shared block only). With
      `--redraw` every pair's frame is drawn anew each step (new font, size, motion, frame), as training draws
      it every epoch; without, the frames stay fixed.

    python benchmarks/cav_mae_diagnose.py --steps 200 --pairs 64
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maeframe.build import prepare
from maeframe.masker import Mask
from maeframe.model.joint import JointMaskedAutoencoder
from maeframe_plugins.contrastive import info_nce
from maeframe_plugins.spoken_letters import SpokenLettersDataset, SpokenLettersOptions

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cav_mae_klettres.yaml"


def build(overrides: list[str]):
    prepared = prepare(RECIPE, overrides)
    flows = prepared.modalities
    model = JointMaskedAutoencoder({n: c.tokenizer.spec for n, c in flows.items()},
                                   {n: c.target.out_dim for n, c in flows.items()}, prepared.recipe.model, typed=True)
    return prepared, model


def dataset(prepared, train: bool) -> SpokenLettersDataset:
    split = prepared.recipe.data.train if train else prepared.recipe.data.eval
    shapes = {n: c.tokenizer.input_shape for n, c in prepared.modalities.items()}
    return SpokenLettersDataset(SpokenLettersOptions(**split.options), shapes, train=train)


def all_visible(patches: torch.Tensor) -> Mask:
    ids = torch.arange(patches.shape[1]).expand(patches.shape[0], -1)
    return Mask(ids, ids, torch.zeros(ids.shape))


def pooled(model, prepared, inputs: dict, masked: bool) -> dict:
    """{m: [B, D]} pooled latents of the batch `inputs`, with the recipe's masks or every token visible."""
    out = {}
    for name, flow in prepared.modalities.items():
        patches = flow.tokenizer.tokenize(inputs[name]).patches
        mask = flow.masker(len(patches), torch.device("cpu")) if masked else all_visible(patches)
        out[name] = model.encoder({name: patches}, {name: mask})[1][name]
    return out


def contrastive(model, prepared, inputs, masked: bool, temperature: float) -> torch.Tensor:
    p = pooled(model, prepared, inputs, masked)
    return info_nce(p["audio"], p["visual"], temperature)[1]  # the recipe's queries: visual


@torch.no_grad()
def measure(model, prepared, inputs, temperature) -> tuple[float, float, float]:
    """-> (InfoNCE all tokens visible, audio->visual R@1 over the pairs, mean off-diagonal cosine of audio)."""
    model.eval()
    p = pooled(model, prepared, inputs, masked=False)
    loss = info_nce(p["audio"], p["visual"], temperature)[1].item()
    a, v = F.normalize(p["audio"], dim=1), F.normalize(p["visual"], dim=1)
    r1 = ((a @ v.T).argmax(1) == torch.arange(len(a))).float().mean().item()
    cos = a @ a.T
    off = (cos.sum() - cos.diagonal().sum()) / (len(a) * (len(a) - 1))
    model.train()
    return loss, r1, off.item()


def check_gradients(model, prepared, inputs, temperature) -> None:
    model.zero_grad()
    contrastive(model, prepared, inputs, True, temperature).backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder.") and (".patch_embed." in name or ".blocks.0.attn.qkv.weight" in name
                                            or name == "encoder.norm.weight"):
            print(f"  (a) grad norm {name}: {p.grad.norm().item() if p.grad is not None else None}")


def check_rows(prepared, train_set) -> None:
    loader = DataLoader(train_set, batch_size=16, shuffle=True, num_workers=0)
    inputs, labels = next(iter(loader))
    ok = all(train_set.classes[train_set.audio.items[i][1]] == train_set.letters[i] for i in range(len(train_set)))
    print(f"  (b) audio label of recording i == letter drawn for i, all {len(train_set)}: {ok}; "
          f"batch shapes {{a: {tuple(inputs['audio'].shape)}, v: {tuple(inputs['visual'].shape)}}}")


def train(overrides, subset: dict, steps: int, lr: float, masked: bool, temperature: float, label: str,
          redraw=None) -> None:
    """`redraw`: None keeps the subset's frames; else a function -> new visual rows [B, C, H, W] of the same
    samples (a new font, size, motion and frame each step, as training draws them every epoch)."""
    torch.manual_seed(0)
    prepared, model = build(overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    before = measure(model, prepared, subset, temperature)
    start = time.time()
    for step in range(1, steps + 1):
        batch = subset if redraw is None else {**subset, "visual": redraw()}
        loss = contrastive(model, prepared, batch, masked, temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 60 == 0:
            print(f"      step {step}: training InfoNCE {loss.item():.3f}")
    after = measure(model, prepared, subset, temperature)
    n = len(subset["audio"])
    print(f"  (c) {label}: InfoNCE {before[0]:.3f} -> {after[0]:.3f} (log B {math.log(n):.3f}), R@1 {before[1]:.3f} "
          f"-> {after[1]:.3f} (chance {1 / n:.3f}), audio cos {before[2]:.3f} -> {after[2]:.3f}, last train "
          f"loss {loss.item():.3f}, {time.time() - start:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="full-batch steps of (c)")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs of (c)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of (c)")
    parser.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    parser.add_argument("--first", action="store_true", help="the first --pairs recordings (as data.train.options."
                                                             "limit takes them) instead of a random subset")
    parser.add_argument("--redraw", action="store_true", help="(c): draw every pair's visual anew each step")
    parser.add_argument("--only", choices=["a", "b", "c"], nargs="*", default=["a", "b", "c"])
    parser.add_argument("--variants", nargs="*", default=["0:masked", "recipe:masked", "recipe:visible"],
                        help="<modality_blocks or recipe>:<masked or visible>[:<recipe override>...]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepared, model = build([])
    train_set = dataset(prepared, train=True)
    torch.manual_seed(0)
    picks = (torch.arange(len(train_set)) if args.first else torch.randperm(len(train_set)))[: args.pairs].tolist()
    samples = [train_set[i][0] for i in picks]
    subset = {name: torch.stack([s[name] for s in samples]) for name in prepared.modalities}
    letters = [train_set.letters[i] for i in picks]
    print(f"{len(picks)} pairs, {len(set(letters))} distinct letters")
    if "a" in args.only:
        check_gradients(model, prepared, {k: v[:32] for k, v in subset.items()}, args.temperature)
    if "b" in args.only:
        check_rows(prepared, train_set)
    if "c" in args.only:
        for variant in args.variants:
            blocks, masking, *extra = variant.split(":")
            overrides = [] if blocks == "recipe" else [f"model.modality_blocks={blocks}",
                                                       f"model.depth={int(blocks) + 1}"]
            overrides += extra
            redraw = (lambda: torch.stack([train_set.visual(i) for i in picks])) if args.redraw else None
            train(overrides, subset, args.steps, args.lr, masking == "masked", args.temperature,
                  variant + (" redrawn" if args.redraw else ""), redraw)


if __name__ == "__main__":
    main()
