"""Building a joint recipe's components: one flow (tokenizer, masker, target, losses) per modality, and the
cross-modal losses. Called by `build.prepare` for recipes with `modalities`."""
from __future__ import annotations

from .build import Components, _construct, build_flow
from .errors import RecipeError
from .loss import CrossModalLoss
from .recipe import Recipe


def prepare_modalities(recipe: Recipe, options: dict, get) -> tuple[dict[str, Components], list]:
    """({modality name: Components}, [(label, weight, CrossModalLoss)]) of a joint recipe, after the checks that
    need the component classes: datasets fit the mixing, tokens fit the shared model."""
    _check_datasets(recipe, options, get)
    modalities: dict[str, Components] = {}
    for name, modality in recipe.modalities.items():
        prefix = f"modalities.{name}."
        tokenizer = _construct(f"{prefix}tokenizer", get("tokenizer", modality.tokenizer), options[f"{prefix}tokenizer"])
        modalities[name] = build_flow(prefix, recipe, modality, tokenizer, options, get)
    if recipe.model.shared_patch_embed:
        sizes = {name: c.tokenizer.spec.patch_dim for name, c in modalities.items()}
        if len(set(sizes.values())) > 1:
            raise RecipeError([("model.shared_patch_embed", f"one patch embedding needs patches of one size, but "
                                                            f"the modalities' tokenizers give {sizes} values per "
                                                            f"patch; match their patch sizes or set it to false")])
    tokenizers = {name: c.tokenizer for name, c in modalities.items()}
    refs = recipe.joint_losses or []
    names = [ref.name for ref in refs]
    joint = []
    for i, ref in enumerate(refs):
        cls = get("loss", ref)
        if not issubclass(cls, CrossModalLoss):
            raise RecipeError([(f"joint_losses.{i}.name", f"{ref.name!r} is a per-modality loss; name it in "
                                                          f"modalities.<name>.losses (joint_losses take "
                                                          f"cross-modal losses, maeframe.CrossModalLoss)")])
        label = ref.name if names.count(ref.name) == 1 else f"{ref.name}.{i}"
        joint.append((label, ref.weight, _construct(f"joint_losses.{i}", cls, options[f"joint_losses.{i}"], tokenizers)))
    return modalities, joint


def _check_datasets(recipe: Recipe, options: dict, get) -> None:
    """Paired mixing reads one paired dataset (`Dataset.paired`); alternate mixing reads one ordinary dataset per
    modality. Repeated sampling (`Dataset.item_repeats`) is not supported in joint recipes."""
    paired = recipe.mixing == "paired"
    refs = [("data.train", recipe.data.train), ("data.eval", recipe.data.eval)] if paired else [
        (f"modalities.{name}.data.{split}", getattr(m.data, split))
        for name, m in recipe.modalities.items() for split in ("train", "eval")]
    for path, ref in refs:
        if ref is None:
            continue
        cls = get("dataset", ref)
        if cls.paired != paired:
            why = ("yields one modality per sample; mixing: paired needs a dataset whose samples hold every "
                   "modality (Dataset.paired)" if paired else
                   "yields several modalities per sample (Dataset.paired); name it in data.train with mixing: paired")
            raise RecipeError([(f"{path}.name", f"dataset {ref.name!r} {why}")])
        if cls.item_repeats(options[path]) > 1:
            raise RecipeError([(f"{path}.options.repeats", "repeated sampling is not supported in joint recipes; "
                                                           "remove it")])
