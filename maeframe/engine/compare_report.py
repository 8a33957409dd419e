"""The report of `maeframe compare`: what each variant's run and evaluation gave (`Variant`), report.json,
report.md with its tables, and the loss-curve and metrics plots."""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..build import Prepared
from ..recipe import flatten_tree
from .evaluate import PSNR_CAP_DB

TAIL_FRACTION = 0.05  # "final train loss" = mean over the last 5% of optimizer steps
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # shown with the command: they change the wall time


@dataclass
class Variant:
    path: str
    prepared: Prepared
    run_dir: Path = None
    resumed: bool = False
    reused: bool = False  # resumed from a finished run: not trained again
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    last_picture: str | None = None
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.prepared.recipe.name


def recipe_differences(variants: list[Variant]) -> dict[str, list[Any]]:
    """{dotted field: [value per variant]} for every resolved-recipe field that is not identical
    (the name and the output directory excluded)."""
    flat = [flatten_tree(v.prepared.recipe.model_dump(mode="json")) for v in variants]
    keys = list(dict.fromkeys(key for tree in flat for key in tree))
    skip = {"name", "runtime.output_dir"}
    return {key: [tree.get(key, "—") for tree in flat] for key in keys
            if key not in skip and len({json.dumps(tree.get(key, "—"), sort_keys=True) for tree in flat}) > 1}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def tail_mean(lines: list[dict[str, Any]], key: str, fraction: float = TAIL_FRACTION) -> float | None:
    """Mean of `key` over the last `fraction` of optimizer steps. Each metrics line averages the steps
    since the previous line, so lines are weighted by how many of their steps fall in the tail."""
    if not lines:
        return None
    last = lines[-1]["step"]
    begin = last - max(1, math.ceil(fraction * last))
    total = weight = 0.0
    previous = 0
    for line in lines:
        step = line["step"]
        overlap = step - max(previous, begin)
        if overlap > 0 and key in line:
            total += line[key] * overlap
            weight += overlap
        previous = step
    return total / weight if weight else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    facts = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "python": platform.python_version(), "torch": torch.__version__, "maeframe": __version__,
             "platform": platform.platform()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def default_command(paths, name, overrides, eval_limit, knn_train_limit) -> str:
    parts = ["maeframe", "compare", *map(str, paths), "--name", name]
    for override in overrides:
        parts += ["--set", override]
    parts += ["--eval-limit", str(eval_limit), "--knn-train-limit", str(knn_train_limit)]
    return shlex.join(parts)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def build_report(variants: list[Variant], name: str, root: Path, overrides, seed: int, eval_ratio: float,
                 eval_limit, knn_train_limit, command: str, total_seconds: float) -> dict[str, Any]:
    rows = []
    for v in variants:
        terms = sorted({key for line in v.metrics for key in line if key.startswith("loss/")})
        recipe = v.prepared.recipe
        rows.append({
            "variant": v.name, "recipe": v.path, "run_dir": str(v.run_dir),
            "masker": recipe.masker.model_dump(mode="json"), "target": recipe.target.model_dump(mode="json"),
            "losses": [ref.model_dump(mode="json") for ref in recipe.losses],
            "steps": v.facts.get("final_step"), "total_steps": v.facts.get("total_steps"),
            "final_train_loss": tail_mean(v.metrics, "loss"),
            "final_train_terms": {term[len("loss/"):]: tail_mean(v.metrics, term) for term in terms},
            "last_training_picture": v.last_picture,
            "train_seconds": round(v.train_seconds, 2), "train_cpu_seconds": round(v.train_cpu_seconds, 2),
            "resumed": v.resumed, "reused": v.reused,
            "load_average_before": v.load_before, "load_average_after": v.load_after,
            "device": v.facts.get("device"), "params": v.facts.get("params"),
            "equivalent_run": shlex.join(["maeframe", "run", v.path,
                                          *(o for o in overrides if not o.startswith("runtime.output_dir=")),
                                          f"runtime.output_dir={root}"]),
            **{f"eval.{key}": value for key, value in v.evaluation.items()},
        })
    return {
        "name": name, "command": command, "seed": seed, "machine": machine_facts(),
        "evaluation": {"mask": f"random, ratio {eval_ratio}, torch.Generator seeded {seed} (same for all variants)",
                       "eval_limit": eval_limit, "knn_train_limit": knn_train_limit,
                       "psnr_cap_db": PSNR_CAP_DB, "tail_fraction": TAIL_FRACTION},
        "overrides": list(overrides), "total_seconds": round(total_seconds, 1),
        "differences": recipe_differences(variants), "variants": rows,
    }


def write_report(report: dict[str, Any], variants: list[Variant], root: Path) -> None:
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_losses(variants, root / "loss_curves.png")
    plot_metrics(report["variants"], root / "metrics.png")
    (root / "report.md").write_text(render_markdown(report, root))


def render_markdown(report: dict[str, Any], root: Path) -> str:
    machine, rows = report["machine"], report["variants"]
    terms = list(dict.fromkeys(t for row in rows for t in row["final_train_terms"]))
    header = ["variant", "final train loss", "masked PSNR (dB) ↑", "HF error ↓", "kNN top-1 ↑", "train wall time (process CPU time)",
              *[f"train {t}" for t in terms], *[f"eval {t}" for t in terms]]
    lines = [f"# Comparison `{report['name']}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        knn = row.get("eval.knn_top1")
        cells = [f"`{row['variant']}`", _fmt(row["final_train_loss"]), _fmt(row.get("eval.masked_psnr"), 2),
                 _fmt(row.get("eval.hf_error")), "n/a" if knn is None else f"{100 * knn:.2f}%",
                 f"{row['train_seconds']:.0f} s (CPU {row['train_cpu_seconds']:.0f} s)"
                 + (" (reused run)" if row.get("reused") else " (resumed)" if row["resumed"] else ""),
                 *[_fmt(row["final_train_terms"].get(t)) for t in terms],
                 *[_fmt(row.get(f"eval.eval_loss/{t}")) for t in terms]]
        lines.append("| " + " | ".join(cells) + " |")
    evaluation = report["evaluation"]
    lines += [
        "", "final train loss / train <term>: mean over the last 5% of optimizer steps (metrics.jsonl; the total "
        "includes every weighted term, so compare totals only between variants with the same losses). "
        "eval <term>: the term on the eval images under the fixed eval mask. "
        f"Masked PSNR: display space [0, 1], hidden pixels only, per image then averaged, capped at "
        f"{evaluation['psnr_cap_db']:.0f} dB. HF error: mean |Laplacian(pasted) − Laplacian(original)| over hidden "
        "pixels. kNN: cosine, k=20, T=0.07 on mean-pooled encoder features. See docs/compare.md.", "",
        "![loss curves](loss_curves.png)", "", "![metrics](metrics.png)", "",
        "## Setup", "",
        f"- seed: {report['seed']} (model init, masks, data order and augmentation; all variants)",
        f"- evaluation mask: {evaluation['mask']}; {rows[0].get('eval.eval_images')} eval images; kNN bank: "
        f"{rows[0].get('eval.knn_train_images')} train images without augmentation",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} logical CPUs, torch using {machine['torch_threads']} "
        f"threads{', GPU ' + machine['gpu'] if 'gpu' in machine else ''}; {machine['platform']}; Python "
        f"{machine['python']}, torch {machine['torch']}, maeframe {machine['maeframe']}",
        f"- training device per variant: " + "; ".join(f"`{r['variant']}`: {r['device']}" for r in rows),
        "- load average (1/5/15 min) before → after training: " + "; ".join(
            f"`{r['variant']}`: {r['load_average_before']} → {r['load_average_after']}" for r in rows),
        f"- this invocation (training + evaluation + report): {report['total_seconds']:.0f} s"
        + (" (reused runs were not trained again)" if any(r.get("reused") for r in rows) else ""), "",
        "## Commands", "", "```", report["command"], "```", "",
        *(["Variants marked *reused run* were trained by an earlier run of this command (without `--resume`) "
           "and only re-evaluated now; their training wall time is the one stored then "
           "(`<variant>/compare-wall.json`).", ""] if any(r.get("reused") for r in rows) else []),
        "Each variant is the same as:", "", "```", *[r["equivalent_run"] for r in rows], "```", "",
        "## Variants", "",
    ]
    for row in rows:
        losses = " + ".join(f"{ref['weight']:g}·{ref['name']}{_options(ref['options'])}" for ref in row["losses"])
        lines += [f"- `{row['variant']}` ({row['recipe']}): masker `{row['masker']['name']}`"
                  f"{_options(row['masker']['options'])}; target `{row['target']['name']}`"
                  f"{_options(row['target']['options'])}; losses {losses}; {row['steps']} steps"]
    if report["differences"]:
        lines += ["", "Resolved-recipe fields that differ:", "", "| field | " +
                  " | ".join(f"`{r['variant']}`" for r in rows) + " |", "|" + "---|" * (len(rows) + 1)]
        for key, values in report["differences"].items():
            lines.append(f"| `{key}` | " + " | ".join("—" if v == "—" else f"`{json.dumps(v, ensure_ascii=False)}`"
                                                     for v in values) + " |")
    lines += ["", "## Reconstructions", "",
              "Rows: eval images; columns: original | masked | reconstruction | reconstruction pasted into the "
              "visible patches. `eval-recon-*`: the fixed evaluation mask (identical for all variants); `recon-*`: "
              "the last picture written during training (the variant's own masker).", ""]
    for row in rows:
        v, last = row["variant"], row.get("last_training_picture")
        lines.append(f"- `{v}`, fixed eval mask: [eval-recon-{v}.png](eval-recon-{v}.png)")
        if (root / f"recon-{v}.png").is_file():
            lines.append(f"- `{v}`, last training picture ({last}): [recon-{v}.png](recon-{v}.png)")
        elif last:
            lines.append(f"- `{v}`, last training picture ({last}): identical to eval-recon-{v}.png (the training "
                         f"picture's mask, drawn from the seed, coincides with the fixed eval mask)")
    return "\n".join(lines) + "\n"


def _options(options: dict) -> str:
    return f" {json.dumps(options, separators=(', ', ': '))}" if options else ""


def plot_losses(variants: list[Variant], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({k for v in variants for line in v.metrics for k in line if k.startswith("loss/")})
    shared = [t for t in terms if all(any(t in line for line in v.metrics) for v in variants)]
    extra_panel = any(len({k for line in v.metrics for k in line if k.startswith("loss/")}) > 1 for v in variants)
    panels = [("loss", "total training loss")] + ([(t, f"training {t}") for t in shared] if extra_panel else [])
    if any("masker/ratio" in line for v in variants for line in v.metrics):
        panels.append(("masker/ratio", "mask ratio (variants that log it)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, v in enumerate(variants):  # one colour per variant in every panel (and in metrics.png)
            points = [(line["step"], line[key]) for line in v.metrics if key in line]
            if points:
                ax.plot(*zip(*points), label=v.name, linewidth=1, color=f"C{i}")
        if key.startswith("loss"):  # clip the first few steps' spike so the differences stay visible
            late = [line[key] for v in variants for line in v.metrics
                    if key in line and line["step"] > 0.03 * v.metrics[-1]["step"]]
            low = min((line[key] for v in variants for line in v.metrics if key in line), default=None)
            if late and low is not None and max(late) > low:
                ax.set_ylim(low - 0.05 * (max(late) - low), max(late) + 0.1 * (max(late) - low))
                title += " (first 3% of steps clipped)"
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("eval.masked_psnr", "masked PSNR (dB), higher is better", 1),
               ("eval.hf_error", "high-frequency error, lower is better", 1),
               ("eval.knn_top1", "kNN top-1 (%), higher is better", 100)]
    metrics = [m for m in metrics if any(row.get(m[0]) is not None for row in rows)] or metrics[:1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    names = [row["variant"] for row in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    for ax, (key, title, scale) in zip(axes[0], metrics):
        values = [(row.get(key) or 0.0) * scale for row in rows]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
        low, high = min(values), max(values)
        if high > 0 and low > 0.5 * high:  # zoom in on close values; the title says so
            ax.set_ylim(low - 0.6 * (high - low) - 0.02 * high, high + 0.4 * (high - low) + 0.02 * high)
            title += "\n(y axis does not start at 0)"
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
