"""Joint CAV-MAE against single-modality MAEs on the spoken-letter pairs (docs/multimodal.md, CAV-MAE section).

Once: each modality's k-NN on its flattened normalised inputs (`knn.features: pixels`). Then for each seed
three pretraining runs of the same encoder size and the same steps:
  joint   recipes/cav_mae_klettres.yaml (audio + visual, contrastive term), then `task: retrieval` on it
          (audio<->visual recall@k, each modality's k-NN) and on the same model with random weights;
  audio   the joint recipe's audio flow alone (its tokenizer, masker, target, loss; depth = modality blocks +
          shared blocks, so the audio path has the same blocks and width) on klettres_letter_sounds, then k-NN;
  visual  the same for the visual flow on klettres_letter_clips, then k-NN.
Every run uses the joint recipe's data options, optimiser, epochs and batch size (same samples, same steps).
Writes <out>/results.json (every run's metrics and their mean ± std over seeds) and prints a Markdown table.

    python benchmarks/cav_mae_klettres.py --seeds 0 1 2 --out runs/cav_bench
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

JOINT = Path(__file__).resolve().parents[1] / "recipes" / "cav_mae_klettres.yaml"
SINGLE_DATA = {"audio": "klettres_letter_sounds", "visual": "klettres_letter_clips"}


def run(recipe: dict, folder: Path) -> dict:
    """Write `recipe` to <folder>/<name>.yaml, run it with the CLI, return its results.json (or metrics)."""
    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "maeframe", "run", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
    results = folder / recipe["name"] / "results.json"
    return json.loads(results.read_text()) if results.is_file() else {}


def single(joint: dict, modality: str, seed: int, folder: Path) -> dict:
    """The pretraining recipe of one modality of the joint recipe, same sizes, data, optimiser and steps."""
    flow = joint["modalities"][modality]
    model = {k: v for k, v in joint["model"].items() if k not in ("modality_blocks", "pooled_latent")}
    data = copy.deepcopy(joint["data"])
    for split in ("train", "eval"):
        data[split]["name"] = SINGLE_DATA[modality]
    return {"task": "pretrain", "name": f"{modality}_only_s{seed}", "seed": seed, "tokenizer": flow["tokenizer"],
            "masker": flow["masker"], "target": flow["target"], "losses": flow["losses"], "model": model,
            "data": data, "optim": joint["optim"], "runtime": {**joint["runtime"], "output_dir": str(folder)}}


def knn(pretrain: dict, folder: Path, pixels: bool = False) -> dict:
    """k-NN of a single-modality checkpoint (bank = its training split, queries = its eval split), or with
    `pixels` of the flat normalised inputs (no encoder)."""
    encoder = {k: pretrain["model"][k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")}
    data = {split: pretrain["data"][split] for split in ("train", "eval")}
    data.update(batch_size=64, num_workers=0)
    init = {"format": "none"} if pixels else {"format": "maeframe",
                                              "checkpoint": str(folder / pretrain["name"] / "last.pt")}
    recipe = {"task": "knn", "name": f"knn_{pretrain['name']}{'_pixels' if pixels else ''}",
              "seed": pretrain["seed"], "init": init, "tokenizer": pretrain["tokenizer"], "model": encoder,
              "data": data, "knn": {"k": 20, "temperature": 0.07, "pool": "avg",
                                    "features": "pixels" if pixels else "encoder"},
              "runtime": {"threads": 1, "output_dir": str(folder), "progress_bar": False, "tensorboard": False}}
    return run(recipe, folder)["final"]


def retrieval(joint_name: str, seed: int, folder: Path, data: dict, random_weights: bool) -> dict:
    data = {**{split: data[split] for split in ("train", "eval")}, "batch_size": 64, "num_workers": 0}
    recipe = {"task": "retrieval", "name": f"retrieval_{joint_name}{'_random' if random_weights else ''}",
              "seed": seed, "init": {"checkpoint": str(folder / joint_name / "last.pt"),
                                     "random_weights": random_weights},
              "data": data, "runtime": {"threads": 1, "output_dir": str(folder), "progress_bar": False,
                                        "tensorboard": False}}
    return run(recipe, folder)


def train_mse(run_dir: Path, key: str) -> float:
    """Mean of a loss term over the last 5 logged lines (the last 50 steps at log_interval 10)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [line[key] for line in lines if key in line][-5:]
    return sum(values) / len(values)


def summary(rows: list[dict]) -> dict[str, str]:
    keys = sorted({k for row in rows for k in row})
    out = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        out[key] = f"{statistics.mean(values):.3f}{spread}"
    return out


COLUMNS = ["mse/audio", "mse/visual", "knn/audio/top1", "knn/visual/top1", *(f"retrieval/{q}_to_{k}/R@{n}" for q, k in
                                                    (("audio", "visual"), ("visual", "audio")) for n in (1, 5, 10))]
LABELS = {"joint": "CAV-MAE (joint)", "joint_random": "same model, random weights", "audio_only": "audio-only MAE",
          "visual_only": "visual-only MAE", "pixels": "flat inputs (pixels / log-mel)"}


def markdown(summaries: dict[str, dict[str, str]], chance: dict[str, float]) -> str:
    """The results as a Markdown table: one row per model, '' where a model has no such metric."""
    head = ["model", "audio MSE", "visual MSE", "audio k-NN", "visual k-NN",
            *(f"{c.split('/')[1].replace('_to_', '→')} {c.split('/')[2]}" for c in COLUMNS[4:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in LABELS.items():
        lines.append("| " + " | ".join([label, *(summaries.get(key, {}).get(c, "") for c in COLUMNS)]) + " |")
    lines.append("| chance | | | | | " + " | ".join(f"{chance[f'R@{n}']:.3f}" for _ in range(2) for n in (1, 5, 10)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds")
    parser.add_argument("--epochs", type=int, default=None, help="override the joint recipe's optim.epochs")
    parser.add_argument("--out", type=Path, default=Path("runs/cav_bench"), help="folder for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    joint = yaml.safe_load(JOINT.read_text())
    if args.epochs:
        joint["optim"]["epochs"] = args.epochs
        joint["optim"]["warmup_epochs"] = min(joint["optim"]["warmup_epochs"], args.epochs)
        joint["runtime"]["checkpoint_interval"] = args.epochs
        joint["runtime"]["visualize_interval"] = args.epochs
    rows: dict[str, list[dict]] = {"joint": [], "joint_random": [], "audio_only": [], "visual_only": [],
                                   "pixels": [{}]}
    for modality in ("audio", "visual"):  # the inputs themselves, flattened: no encoder, no seed
        rows["pixels"][0][f"knn/{modality}/top1"] = knn(single(joint, modality, 0, args.out), args.out,
                                                        pixels=True)["top1"] / 100
    for seed in args.seeds:
        recipe = {**copy.deepcopy(joint), "name": f"cav_mae_s{seed}", "seed": seed}
        recipe["runtime"] = {**recipe["runtime"], "output_dir": str(args.out)}
        run(recipe, args.out)
        trained = retrieval(recipe["name"], seed, args.out, recipe["data"], random_weights=False)
        untrained = retrieval(recipe["name"], seed, args.out, recipe["data"], random_weights=True)
        rows["joint"].append({**trained["final"], **{f"mse/{m}": train_mse(args.out / recipe["name"], f"loss/{m}/mse")
                                                     for m in ("audio", "visual")}})
        rows["joint_random"].append(untrained["final"])
        for modality in ("audio", "visual"):
            pretrain = single(joint, modality, seed, args.out)
            run(pretrain, args.out)
            rows[f"{modality}_only"].append({f"knn/{modality}/top1": knn(pretrain, args.out)["top1"] / 100,
                                             f"mse/{modality}": train_mse(args.out / pretrain["name"], "loss/mse")})
        chance = trained["chance"]
        (args.out / "results.json").write_text(json.dumps(
            {"seeds": args.seeds[: len(rows["joint"])], "epochs": joint["optim"]["epochs"], "chance": chance,
             "pairs": trained["pairs"], "runs": rows, "summary": {k: summary(v) for k, v in rows.items()}},
            indent=2) + "\n")
    print(markdown({k: summary(v) for k, v in rows.items()}, chance))
    print(f"{trained['pairs']} held-out pairs, seeds {args.seeds}")


if __name__ == "__main__":
    main()
