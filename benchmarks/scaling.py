"""How the MAE training step scales with the mask ratio and the encoder size (the paper's speed argument).

    python benchmarks/scaling.py [--sizes small,base] [--ratios 0,0.25,0.5,0.75,0.9] [--batch-size 4]
        [--steps 3] [--warmup 1] [--device auto] [--precision auto] [--compile]
        [--out benchmarks/results/NAME.json] [--plot benchmarks/results/NAME.png]

For each encoder size and mask ratio it builds maeframe's engine step (`MAEStep`, as
`benchmarks/pretrain_step.py` does) from `recipes/image_mae_vitb.yaml` with the encoder's width, depth and
heads overridden (the MAE decoder, 8 × 512, stays), and records:

* FLOPs of one forward + backward per image, split into encoder and decoder (`FlopCounterMode`'s module
  attribution) — exact and machine-independent;
* measured step time (min and median over the timed steps; min is robust on shared CPUs).

The encoder sees only the visible tokens, so its cost falls with the visible fraction while the decoder's
stays; the ratio "step time at mask 0 / step time at mask 0.75" is the speed-up the MAE paper reports as
2.8–4.1× for ViT-L (encoder with mask tokens vs encoder on visible tokens only).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_step as bench  # noqa: E402  (the shared step, FLOP and environment helpers)

from maeframe.build import prepare  # noqa: E402
from maeframe.engine.runtime import select_runtime  # noqa: E402

RECIPE = bench.REPO / "recipes" / "image_mae_vitb.yaml"
SIZES = {  # encoder: width, depth, heads (ViT-Ti/S/B/L/H of the ViT and MAE papers)
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def split_flops(step: bench.MaeframeStep, batch: torch.Tensor) -> dict[str, float]:
    """GFLOP per image of forward + backward: total, encoder, decoder (from FlopCounterMode's modules)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=bench._flop_mapping())
    with counter:
        step.loss_for_flops(batch).backward()
    step.optimizer.zero_grad(set_to_none=True)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    per_image = lambda name: round(counts.get(name, 0) / batch.shape[0] / 1e9, 4)  # noqa: E731
    return {"total": per_image("Global"), "encoder": per_image("MaskedAutoencoder.encoder"),
            "decoder": per_image("MaskedAutoencoder.decoder")}


def measure(size: str, ratio: float, args, image_size: int) -> dict:
    width, depth, heads = SIZES[size]
    overrides = [f"model.embed_dim={width}", f"model.depth={depth}", f"model.num_heads={heads}",
                 f"tokenizer.options.image_size={image_size}"]
    prepared = prepare(RECIPE, overrides)
    # set after validation, which refuses ratios that hide no token (mask 0 has a NaN loss: a timing reference only)
    prepared.components.masker.options.ratio = ratio
    config = prepared.recipe.runtime.model_copy(update={"device": args.device, "precision": args.precision,
                                                        "threads": None})
    runtime = select_runtime(config)
    torch._dynamo.reset()  # each configuration compiles its own graphs (and never counts toward recompile limits)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, *prepared.components.tokenizer.input_shape, device=runtime.device)
    step = bench.MaeframeStep(prepared, runtime, args.batch_size, args.compile)
    for _ in range(args.warmup):
        step.train_step(batch)
    bench.sync(runtime.device)
    flops = split_flops(step, batch)
    with bench.ForeignLoad() as load:
        times = bench._timed_steps(step, batch, args.steps, 0, rss_interval=0)["step_s"]
    del step, batch
    gc.collect()
    return {"size": size, "mask_ratio": ratio, "visible_tokens": round((1 - ratio) * (image_size // 16) ** 2),
            "gflop_per_img": flops, "step_ms_min": round(1e3 * min(times), 2),
            "step_ms_median": round(1e3 * statistics.median(times), 2), "img_s_best": round(args.batch_size / min(times), 2),
            "foreign_cpu_share": None if load.share is None else round(load.share, 3), "device": bench.device_name(runtime.device),
            "precision": runtime.precision}


def speedups(rows: list[dict]) -> dict[str, dict]:
    """Per size: step time and FLOPs at each ratio relative to ratio 0 (no masking)."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        base = next((r for r in mine if r["mask_ratio"] == 0), None)
        if base is None:
            continue
        out[size] = {str(r["mask_ratio"]): {"time": round(base["step_ms_min"] / r["step_ms_min"], 2),
                                            "flops": round(base["gflop_per_img"]["total"] / r["gflop_per_img"]["total"], 2),
                                            "encoder_flops": round(base["gflop_per_img"]["encoder"] / r["gflop_per_img"]["encoder"], 2)}
                     for r in mine}
    return out


def plot(report: dict, path: Path) -> None:
    """Left: step time vs mask ratio per size (and the encoder's share of it by FLOPs). Right: GFLOP per image
    of the encoder at mask 0 and at the reference ratio, and of the decoder, per size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref = report["rows"], report["reference_ratio"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / 3
    for i, size in enumerate(sizes):
        mine = sorted((r for r in rows if r["size"] == size), key=lambda r: r["mask_ratio"])
        ratios = [r["mask_ratio"] for r in mine]
        line, = left.plot(ratios, [r["step_ms_min"] for r in mine], "o-", label=f"ViT-{size[0].upper()} step")
        left.plot(ratios, [r["step_ms_min"] * r["gflop_per_img"]["encoder"] / r["gflop_per_img"]["total"] for r in mine],
                  "s:", color=line.get_color(), alpha=0.6, label=f"ViT-{size[0].upper()} encoder's share (by FLOPs)")
        at = {r["mask_ratio"]: r["gflop_per_img"] for r in mine}
        if 0.0 in at and ref in at:
            values = [at[0.0]["encoder"], at[ref]["encoder"], at[ref]["decoder"]]
            for j, (value, hatch) in enumerate(zip(values, ["", "//", ".."])):
                right.bar(i + (j - 1) * width, value, width, color=line.get_color(), hatch=hatch, edgecolor="black")
    for hatch, label in zip(["", "//", ".."], ["encoder, mask 0", f"encoder, mask {ref}", "decoder (8 × 512)"]):
        right.bar(0, 0, 0, color="white", hatch=hatch, edgecolor="black", label=label)
    right.set_xticks(range(len(sizes)), [f"ViT-{s[0].upper()}" for s in sizes])
    left.set(xlabel="mask ratio", ylabel="step time (ms, min)", title=f"{report['device']}, batch {report['batch_size']}")
    left.legend(fontsize=7)
    right.set(ylabel="GFLOP / image (fwd + bwd)", title="where the FLOPs go")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,base", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    ratios = [float(r) for r in args.ratios.split(",")]

    started, rows = time.time(), []
    for size in sizes:
        for ratio in ratios:
            row = measure(size, ratio, args, args.image_size)
            rows.append(row)
            print(f"{size:>6} mask {ratio:4.2f}: {row['step_ms_min']:9.1f} ms/step (median {row['step_ms_median']:.1f}), "
                  f"GFLOP/img total {row['gflop_per_img']['total']:.2f} = encoder {row['gflop_per_img']['encoder']:.2f} "
                  f"+ decoder {row['gflop_per_img']['decoder']:.2f}"
                  + (f"  [others used {100 * row['foreign_cpu_share']:.0f}% CPU]" if row["foreign_cpu_share"] else ""),
                  flush=True)
    report = {
        "benchmark": "scaling", "device": rows[0]["device"], "cpu_model": bench.cpu_model(),
        "torch_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git_commit": bench._git_commit(), "recipe": str(RECIPE.relative_to(bench.REPO)),
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "compile": args.compile, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1), "reference_ratio": 0.75 if 0.75 in ratios else ratios[-1],
        "rows": rows,
    }
    report["speedup_vs_no_masking"] = speedups(rows)
    for size, table in report["speedup_vs_no_masking"].items():
        print(f"{size}: speed-up over mask 0 (time / FLOPs): "
              + ", ".join(f"{r}: {v['time']}x / {v['flops']}x" for r, v in table.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
