"""What a resumed run may change in its recipe. A resume continues the run's trajectory, so a field that
would change it (seed, data, model, components, optimizer, schedule, precision, the global batch) is refused
with every such field's old and new value; fields that only change how the run is executed, logged or
checkpointed are allowed and recorded in run.json (`resumes`) and in the kept `recipe-resumed-stepN.yaml`."""
from __future__ import annotations

from typing import Any

from ..errors import MaeframeError
from ..recipe import flatten_tree

# fields a resume may change: where and how the steps run, what is logged and kept, when the run stops
HARMLESS = ("runtime.log_interval", "runtime.progress_bar", "runtime.tensorboard", "runtime.threads",
            "runtime.checkpoint_interval", "runtime.checkpoint_every_steps", "runtime.keep_checkpoints",
            "runtime.visualize_interval", "runtime.visualize_samples", "runtime.max_steps", "runtime.nonfinite",
            "runtime.compile", "runtime.compile_mode", "runtime.strategy", "runtime.device", "runtime.output_dir",
            "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
            "data.max_bad_fraction", "monitor")
# per-process batch and accumulation may change together with the world size, the global batch may not
GLOBAL_BATCH = ("data.batch_size", "optim.accum_steps")


def _harmless(field: str) -> bool:
    return any(field == name or field.startswith(name + ".") for name in HARMLESS)


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old value, new value)} for every resolved-recipe field that differs. A field the old recipe does
    not have (a checkpoint written before the field existed) that the new one leaves at its schema default is
    no change: it means what the older version did (e.g. `modalities: null`, `model.modality_blocks: 0`)."""
    a, b = flatten_tree(old), flatten_tree(new)
    missing = "(absent)"
    defaults = _defaults(new.get("task", "pretrain"))
    return {key: (a.get(key, missing), b.get(key, missing)) for key in dict.fromkeys([*a, *b])
            if a.get(key, missing) != b.get(key, missing)
            and not (key not in a and key in defaults and defaults[key] == b[key])}


def _defaults(task: str) -> dict[str, Any]:
    """{dotted field: default} of the plain-valued fields of the recipe type of `task` and of its nested
    sections (model, runtime, init, ...), as they appear in a dumped recipe."""
    from pydantic import BaseModel

    from ..recipe import RECIPE_TYPES

    out: dict[str, Any] = {}

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
            elif not info.is_required() and info.default_factory is None:
                value = info.default
                out[prefix + name] = list(value) if isinstance(value, tuple) else value

    recipe_type = next((cls for cls in RECIPE_TYPES if cls.model_fields["task"].default == task
                        or task in str(cls.model_fields["task"].annotation)), None)
    if recipe_type is not None:
        walk(recipe_type, "")
    return out


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
