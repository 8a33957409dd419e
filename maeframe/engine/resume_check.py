"""What a resumed run may change in its recipe. A resume continues the run's trajectory, so a field that
would change it (seed, data, model, components, optimizer, schedule, precision, the global batch) is refused
with every such field's old and new value; fields that only change how the run is executed, logged or
checkpointed are allowed and recorded in run.json (`resumes`) and in the kept `recipe-resumed-stepN.yaml`."""
from __future__ import annotations

from typing import Any

from ..errors import MaeframeError, RecipeError
from ..recipe import flatten_tree, parse_recipe

# fields a resume may change: where and how the steps run, what is logged and kept, when the run stops
HARMLESS = ("runtime.log_interval", "runtime.progress_bar", "runtime.loggers", "runtime.tensorboard", "runtime.threads",
            "runtime.checkpoint_interval", "runtime.checkpoint_every_steps", "runtime.keep_checkpoints",
            "runtime.visualize_interval", "runtime.visualize_samples", "runtime.max_steps", "runtime.nonfinite",
            "runtime.compile", "runtime.compile_mode", "runtime.strategy", "runtime.device", "runtime.output_dir",
            "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
            "data.max_bad_fraction", "monitor")
# per-process batch and accumulation may change together with the world size, the global batch may not
GLOBAL_BATCH = ("data.batch_size", "optim.accum_steps")


def _harmless(field: str) -> bool:
    return any(field == name or field.startswith(name + ".") for name in HARMLESS)


def in_current_schema(recipe: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recipe as this version resolves it: fields added since it was written take their defaults
    (which keep the old behaviour), so a new field is not mistaken for a change. A recipe this version cannot
    read is compared as written."""
    try:
        return parse_recipe(recipe).model_dump(mode="json")
    except RecipeError:
        return recipe


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old value, new value)} for every resolved-recipe field that differs; `old` is read with the
    current schema first."""
    a, b = flatten_tree(in_current_schema(old)), flatten_tree(new)
    missing = "(absent)"
    return {key: (a.get(key, missing), b.get(key, missing)) for key in dict.fromkeys([*a, *b])
            if a.get(key, missing) != b.get(key, missing)}


def check_resume(old: dict[str, Any], new: dict[str, Any], old_world: int | None, new_world: int,
                 checkpoint) -> dict[str, tuple[Any, Any]]:
    """The allowed changes between the checkpoint's recipe `old` and this run's `new` (resolved, as dicts);
    raises naming every change that would alter the trajectory."""
    changes = recipe_changes(old, new)
    refused = {k: v for k, v in changes.items() if not _harmless(k) and k not in GLOBAL_BATCH}
    if set(changes) & set(GLOBAL_BATCH):
        world = old_world or new_world
        before = old["data"]["batch_size"] * old["optim"]["accum_steps"] * world
        after = new["data"]["batch_size"] * new["optim"]["accum_steps"] * new_world
        if before != after:
            refused.update({k: v for k, v in changes.items() if k in GLOBAL_BATCH})
            refused["global batch (data.batch_size × optim.accum_steps × processes)"] = (before, after)
    if refused:
        lines = "\n".join(f"  {field}: {theirs!r} → {ours!r}" for field, (theirs, ours) in refused.items())
        raise MaeframeError(f"--resume: the recipe changes what {checkpoint} was training; these fields would "
                            f"change its trajectory:\n{lines}\nresume with the run's own recipe (recipe.yaml in "
                            f"the run directory, or drop the overrides), or start a new run under another name "
                            f"(a downstream recipe can initialise from this checkpoint)")
    return changes
