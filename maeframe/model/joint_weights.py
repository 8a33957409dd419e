"""A joint checkpoint's encoder seen as one modality's single-modality `Encoder` (downstream `init.modality`)."""
from __future__ import annotations

from typing import Any

from torch import Tensor


def modality_encoder_state(model: dict[str, Tensor], modality: str, modality_blocks: int) -> dict[str, Tensor]:
    """The `encoder.*` tensors of a `JointMaskedAutoencoder` state dict as those of a single-modality `Encoder` of
    depth modality_blocks + shared blocks: `modality`'s patch embedding (or the shared one), its blocks as blocks
    0..k-1, the shared blocks after them, the cls token and final norm. Its type embedding, a constant added to
    every embedded token, is folded into the patch embedding's bias, so the tokens entering the blocks are
    those of the joint model. (With k > 0 per-modality blocks, the single encoder's cls token also takes part
    in the first k blocks, where the joint one enters only at the shared blocks.)"""
    own = f"encoder.modalities.{modality}."
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        if key.startswith(own + "blocks."):
            out["encoder.blocks." + key[len(own + "blocks."):]] = value
        elif key.startswith(own + "patch_embed."):
            out["encoder." + key[len(own):]] = value
        elif key.startswith("encoder.blocks."):
            index, rest = key[len("encoder.blocks."):].split(".", 1)
            out[f"encoder.blocks.{int(index) + modality_blocks}.{rest}"] = value
        elif key.startswith(("encoder.patch_embed.", "encoder.cls_token", "encoder.norm.")):
            out[key] = value
    type_embed = model.get(own + "type_embed")
    if type_embed is not None:
        out["encoder.patch_embed.bias"] = out["encoder.patch_embed.bias"] + type_embed.reshape(-1)
    return out


def pick_modality(recipe: dict[str, Any], chosen: str | None, tokenizer: dict[str, Any], source: str) -> str:
    """The modality of the joint recipe `recipe` (a checkpoint's, as a dict) that a downstream recipe uses:
    `chosen` (init.modality) when given, else the one whose tokenizer (name and options) equals `tokenizer`.
    A ValueError naming `init.modality` otherwise."""
    modalities = recipe.get("modalities") or {}
    if chosen is not None:
        if chosen not in modalities:
            raise ValueError(f"init.modality: {chosen!r} is not a modality of {source} (it has "
                             f"{', '.join(modalities) or 'none: a single-modality checkpoint; remove init.modality'})")
        return chosen
    same = [name for name, m in modalities.items() if m["tokenizer"]["name"] == tokenizer.get("name")
            and m["tokenizer"].get("options") == tokenizer.get("options")]
    if len(same) != 1:
        raise ValueError(f"init.modality: {source} is a joint checkpoint of modalities {', '.join(modalities)}; "
                         f"{'several' if same else 'none'} of their tokenizers equal this recipe's, so name the "
                         f"modality whose patch embedding to use")
    return same[0]
