"""`maeframe compare`: train several recipe variants under the same seed, data order and budget, evaluate
each the same way (`engine.evaluate`), and write a report with tables and plots (`compare_report`).

Layout: `<output_dir>/<NAME>/<recipe name>/` holds each variant's ordinary run directory;
`<output_dir>/<NAME>/` holds report.md, report.json, loss_curves.png, metrics.png, and per variant
recon-<variant>.png (its last training reconstruction) and eval-recon-<variant>.png (the fixed eval mask).
`output_dir` is the first recipe's `runtime.output_dir` (after overrides).
"""
from __future__ import annotations

import filecmp
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..build import Prepared, prepare
from ..errors import MaeframeError, RecipeError
from ..recipe import flatten_tree
from .compare_report import THREAD_ENV, Variant, _fmt, build_report, default_command, read_metrics, write_report
from .evaluate import EVAL_RATIO, evaluate_pretrainer

# Fields every variant must share: same seed (init, masks, data order, augmentation), same data, same budget.
SHARED_FIELDS = ["seed", "data.train", "data.eval", "data.batch_size", "optim.epochs", "optim.accum_steps",
                 "runtime.max_steps"]
WALL_FILE = "compare-wall.json"


# --- checks ---------------------------------------------------------------------------------------


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_comparable(variants: list[tuple[str, Prepared]]) -> None:
    """Raise RecipeError naming every field that differs where it must not, or a repeated name."""
    problems: list[tuple[str, str]] = []
    trees = [(path, prepared.recipe.model_dump(mode="json")) for path, prepared in variants]
    (first_path, first), rest = trees[0], trees[1:]
    for dotted in SHARED_FIELDS:
        for path, tree in rest:
            mine, theirs = _get(first, dotted), _get(tree, dotted)
            if mine == theirs:
                continue
            # name the innermost fields that differ, e.g. data.train.options.limit rather than data.train
            flat_mine = flatten_tree(mine, dotted) if isinstance(mine, dict) and isinstance(theirs, dict) else {dotted: mine}
            flat_theirs = flatten_tree(theirs, dotted) if len(flat_mine) > 1 or dotted not in flat_mine else {dotted: theirs}
            for key in dict.fromkeys([*flat_mine, *flat_theirs]):
                if flat_mine.get(key, "—") != flat_theirs.get(key, "—"):
                    problems.append((key, f"differs between variants ({first_path}: {flat_mine.get(key, '—')!r}; "
                                          f"{path}: {flat_theirs.get(key, '—')!r}); a comparison needs the same "
                                          f"seed, data order and budget"))
            break
    problems += [("task", f"{path} is a {tree['task']} recipe; compare trains and evaluates pretraining recipes")
                 for path, tree in trees if tree["task"] != "pretrain"]
    names: dict[str, str] = {}
    for path, tree in trees:
        if tree["name"] in names:
            problems.append(("name", f"{names[tree['name']]} and {path} are both named {tree['name']!r}; each "
                                     f"variant needs a distinct recipe name (its run directory)"))
        names.setdefault(tree["name"], path)
    if problems:
        raise RecipeError(problems, "compare")


# --- the machine ------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads; not the loader workers)."""
    times = os.times()
    return times.user + times.system


def _load() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


# --- running --------------------------------------------------------------------------------------


def load_variants(paths: list[str], overrides: list[str] = ()) -> list[Variant]:
    if len(paths) < 2:
        raise MaeframeError("compare needs at least two recipes")
    variants = [Variant(str(path), prepare(path, list(overrides))) for path in paths]
    joint = [v.path for v in variants if v.prepared.joint]
    if joint:
        raise MaeframeError(f"compare: {joint[0]} is a joint recipe (modalities); compare scores single-modality "
                            f"pretraining recipes (evaluate a joint run's modalities with knn recipes instead)")
    check_comparable([(v.path, v.prepared) for v in variants])
    return variants


def _train(variant: Variant, root: Path, resume: bool, log):
    from .run import make_task

    recipe = variant.prepared.recipe
    recipe.runtime.output_dir = str(root)
    variant.run_dir = root / recipe.name
    wall_file = variant.run_dir / WALL_FILE
    variant.resumed = resume and (variant.run_dir / "last.pt").is_file()
    stored = json.loads(wall_file.read_text()) if variant.resumed and wall_file.is_file() else {}
    trainer = make_task(variant.prepared, resume=variant.resumed)
    already_done = variant.reused = variant.resumed and trainer.step >= trainer.total_steps
    log(f"[{recipe.name}] training {trainer.total_steps} steps ({recipe.optim.epochs} epochs × "
        f"{trainer.steps_per_epoch}) on {trainer.device}{' (resumed at step %d)' % trainer.step if variant.resumed else ''}")
    variant.load_before = _load()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    try:
        trainer.train()
    finally:
        keep = 0.0 if already_done else 1.0  # re-opening a finished run adds nothing to its training time
        variant.train_seconds = stored.get("train_seconds", 0.0) + keep * (time.perf_counter() - started)
        variant.train_cpu_seconds = stored.get("train_cpu_seconds", 0.0) + keep * (_cpu_seconds() - cpu_started)
        variant.load_after = _load()
        if already_done and "load_average_before" in stored:
            variant.load_before, variant.load_after = stored["load_average_before"], stored["load_average_after"]
        wall_file.write_text(json.dumps({"train_seconds": variant.train_seconds,  # unrounded: a resumed
                                         "train_cpu_seconds": variant.train_cpu_seconds,  # report rounds once
                                         "load_average_before": variant.load_before,
                                         "load_average_after": variant.load_after}) + "\n")
    variant.facts = json.loads((variant.run_dir / "run.json").read_text())
    variant.facts["final_step"] = trainer.step
    variant.metrics = read_metrics(variant.run_dir)
    log(f"[{recipe.name}] trained in {variant.train_seconds:.1f} s; evaluating")
    return trainer


def compare(paths: list[str], name: str | None = None, overrides: list[str] = (), *, eval_limit: int | None = 10000,
            knn_train_limit: int | None = 10000, eval_ratio: float = EVAL_RATIO, eval_seed: int | None = None,
            resume: bool = False, command: str | None = None, log=print) -> dict[str, Any]:
    """Run every recipe to completion, evaluate each under the same fixed mask, write the report.
    Returns the report.json content. `eval_seed` defaults to the recipes' shared seed."""
    variants = load_variants(paths, overrides)
    first = variants[0].prepared.recipe
    name = name or "-vs-".join(v.name for v in variants)
    root = Path(first.runtime.output_dir) / name
    seed = first.seed if eval_seed is None else eval_seed
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for variant in variants:
        trainer = _train(variant, root, resume, log)
        variant.evaluation = evaluate_pretrainer(trainer, eval_ratio=eval_ratio, seed=seed, limit=eval_limit,
                                                 knn_train_limit=knn_train_limit,
                                                 panel_path=root / f"eval-recon-{variant.name}.png")
        log(f"[{variant.name}] " + ", ".join(f"{k} {_fmt(v)}" for k, v in variant.evaluation.items()
                                               if k in ("masked_psnr", "hf_error", "knn_top1")))
        pictures = sorted((variant.run_dir / "reconstructions").glob("*.png"))
        variant.last_picture = str(pictures[-1].relative_to(root)) if pictures else None
        eval_picture = root / f"eval-recon-{variant.name}.png"
        copy = root / f"recon-{variant.name}.png"
        if pictures and not (eval_picture.is_file() and filecmp.cmp(pictures[-1], eval_picture, shallow=False)):
            shutil.copyfile(pictures[-1], copy)
        elif copy.is_file():
            copy.unlink()  # left by an earlier report; the eval picture shows the same now
        del trainer
        gc.collect()
    command = command or default_command(paths, name, overrides, eval_limit, knn_train_limit)
    threads = " ".join(f"{key}={os.environ[key]}" for key in THREAD_ENV if key in os.environ)
    report = build_report(variants, name, root, overrides, seed, eval_ratio, eval_limit, knn_train_limit,
                          f"{threads} {command}" if threads else command, time.perf_counter() - started)
    write_report(report, variants, root)
    log(f"report: {root / 'report.md'}")
    return report
