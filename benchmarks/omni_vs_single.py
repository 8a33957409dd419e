"""Joint OmniMAE pretraining against single-modality pretraining of the same model, steps and data.

    python benchmarks/omni_vs_single.py [--seeds 0 1 2] [--out benchmarks/results/omni_vs_single]
        [--image-bank N --image-queries N --video-bank N --video-queries N] [dotted.key=value ...]

For each seed it runs, through the `maeframe` CLI (so the commands are what a person would type):

* joint: recipes/omni_mae_fmnist.yaml (images and clips alternate, one modality per step);
* image: the same recipe's image modality alone, as a single-modality recipe (same tokenizer, masker,
  target, loss, data and model), trained for the same number of steps;
* video: the same for the video modality;

then k-NN top-1 of every encoder (and of a random one of the same size) on images (recipes/knn_omni_fmnist_image.yaml) and on clips
(recipes/knn_omni_fmnist_video.yaml; the joint checkpoint through `init.modality`, the single ones as they
are). The single recipes keep `optim.epochs` × their steps per epoch equal to the joint run's steps (the recipe
gives both modalities the same number of samples, so that is 2× the joint epochs) and the same warmup in
steps. Writes <out>/results.json and <out>/results.md (a table per seed and the mean) and keeps the runs
under <out>/runs/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
JOINT = RECIPES / "omni_mae_fmnist.yaml"


def single_recipe(joint: dict, modality: str, seed: int, half: bool = False) -> dict:
    """The joint recipe's `modality` alone: its flow and data at the top level, the same model, the same steps
    (`half`: half of them, i.e. as many steps of this modality as the joint run gives it on average)."""
    flow = joint["modalities"][modality]
    sizes = [m["data"]["train"]["options"]["limit"] for m in joint["modalities"].values()]
    if len(set(sizes)) != 1:
        raise SystemExit("the comparison assumes equal sample counts per modality (same steps at 2× the epochs)")
    share = len(sizes) // (2 if half else 1)  # a joint epoch covers every modality once: `share`× epochs alone
    model = {k: v for k, v in joint["model"].items() if k not in ("modality_blocks", "shared_patch_embed")}
    optim = {**joint["optim"], "epochs": joint["optim"]["epochs"] * share,
             "warmup_epochs": joint["optim"]["warmup_epochs"] * share}
    return {"task": "pretrain", "name": f"{modality}_only", "seed": seed,
            **{key: flow[key] for key in ("tokenizer", "masker", "target", "losses")},
            "model": model, "data": {**joint["data"], **flow["data"]}, "optim": optim, "runtime": joint["runtime"]}


def maeframe(*args: str) -> None:
    command = [sys.executable, "-m", "maeframe", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def knn(checkpoint: Path | None, which: str, out: Path, name: str, bank: int, queries: int,
        modality: str | None) -> float:
    """k-NN top-1 of `checkpoint`'s encoder (None: a random encoder of the same size, init.format: none)."""
    init = [f"init.checkpoint={checkpoint}"] if checkpoint else ["init.format=none", "init.checkpoint=null"]
    extra = [f"init.modality={modality}"] if modality else ["init.modality=null"]
    maeframe("run", str(RECIPES / f"knn_omni_fmnist_{which}.yaml"), f"name={name}", *init,
             f"runtime.output_dir={out}", f"data.train.options.limit={bank}", f"data.eval.options.limit={queries}",
             *extra)
    return json.loads((out / name / "results.json").read_text())["final"]["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "omni_vs_single")
    parser.add_argument("--image-bank", type=int, default=10000)
    parser.add_argument("--image-queries", type=int, default=10000)
    parser.add_argument("--video-bank", type=int, default=1024)
    parser.add_argument("--video-queries", type=int, default=500)
    parser.add_argument("--also-half", action="store_true", help="also train each single modality for half the "
                                                                 "steps (the joint run's share of each)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of every pretraining run (e.g. runtime.threads=2)")
    args = parser.parse_args()
    runs = args.out / "runs"
    joint = yaml.safe_load(JOINT.read_text())
    rows = []
    for seed in args.seeds:
        common = [f"seed={seed}", f"runtime.output_dir={runs}", "runtime.progress_bar=false", *args.overrides]
        checkpoints = {}
        maeframe("run", str(JOINT), f"name=joint_s{seed}", *common)
        checkpoints["joint"] = runs / f"joint_s{seed}" / "last.pt"
        for modality in ("image", "video"):
            for half in (False, True) if args.also_half else (False,):
                label = f"{modality}_half" if half else modality
                with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
                    yaml.safe_dump(single_recipe(joint, modality, seed, half), handle, sort_keys=False)
                maeframe("run", handle.name, f"name={label}_only_s{seed}", *common)
                checkpoints[label] = runs / f"{label}_only_s{seed}" / "last.pt"
        checkpoints["random"] = None  # the untrained encoder (seeded), as a floor
        for model, checkpoint in checkpoints.items():
            row = {"seed": seed, "model": model}
            if model in ("joint", "image", "image_half", "random"):
                row["image_top1"] = knn(checkpoint, "image", runs, f"knn_image_{model}_s{seed}", args.image_bank,
                                        args.image_queries, "image" if model == "joint" else None)
            if model in ("joint", "video", "video_half", "random"):
                row["video_top1"] = knn(checkpoint, "video", runs, f"knn_video_{model}_s{seed}", args.video_bank,
                                        args.video_queries, "video" if model == "joint" else None)
            if checkpoint is not None:
                row["final_loss"] = json.loads((checkpoint.parent / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
            rows.append(row)
            print(row, flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str) + "\n")
    lines = ["| model | seed | image k-NN top-1 | video k-NN top-1 |", "|---|---|---|---|"]
    fmt = lambda v: f"{v:.2f}" if v is not None else "—"  # noqa: E731
    for row in rows:
        lines.append(f"| {row['model']} | {row['seed']} | {fmt(row.get('image_top1'))} | {fmt(row.get('video_top1'))} |")
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [r for r in rows if r["model"] == model]
        means = {key: statistics.mean(r[key] for r in mine) if mine and key in mine[0] else None
                 for key in ("image_top1", "video_top1")}
        lines.append(f"| {model} | mean of {len(mine)} | {fmt(means['image_top1'])} | {fmt(means['video_top1'])} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
