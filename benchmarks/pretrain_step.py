"""Time full MAE pretraining steps of maeframe, next to Hugging Face's ViTMAEForPreTraining.

    python benchmarks/pretrain_step.py RECIPE [dotted.key=value ...] --batch-size B --steps N --warmup W
        [--compile] [--precision auto|bf16|fp32] [--repeats R] [--no-reference] [--peak-tflops T]
        [--out benchmarks/results/NAME.json]

One timed step is what maeframe's engine does per optimizer step (`maeframe.engine.step.TrainStep` with
one micro-batch): tokenize, mask, forward under autocast, target, losses, backward, grad norm and
non-finite check, AdamW step, zero_grad.
The input is a synthetic random batch of the tokenizer's `input_shape`, created once on the device, so
no data loading is timed. The reference is `transformers.ViTMAEForPreTraining` built with the same sizes,
stepped with `torch.optim.AdamW` in the same precision. See benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import timm
import torch
from torch.utils import flop_counter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import maeframe  # noqa: E402
from maeframe import as_pair  # noqa: E402
from maeframe.build import prepare  # noqa: E402
from maeframe.engine.distributed import World  # noqa: E402
from maeframe.engine.optim import peak_lr  # noqa: E402
from maeframe.engine.runtime import Runtime, select_runtime  # noqa: E402
from maeframe.engine.step import MAEStep  # noqa: E402

from official_mae import OfficialMae, official_grad_norm, official_param_groups  # noqa: E402

MB = 2**20

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets: (bf16 tensor core, tf32 tensor
# core, fp32 non-tensor). Matched by substring of torch.cuda.get_device_name(), first match wins, so the
# more specific names come first. fp32 runs use the tf32 column when torch's float32 matmul precision
# allows TF32 ("high"/"medium"), else the plain fp32 column.
PEAK_TFLOPS = [
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),   # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", (989.4, 494.7, 66.9)),   # SXM, same compute as H100 SXM
    ("A100", (312.0, 156.0, 19.5)),
]


# --- the environment -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for CPUs; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32, fp32) in PEAK_TFLOPS:
        if key in name:
            if precision == "bf16":
                return bf16 * 1e12, f"table: {key} bf16 dense"
            if torch.get_float32_matmul_precision() != "highest":
                return tf32 * 1e12, f"table: {key} tf32 dense"
            return fp32 * 1e12, f"table: {key} fp32"
    return None, f"{name!r} not in the table; pass --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, buffers and optimizer state: what an implementation keeps between steps."""
    opt = [v for state in optimizer.state.values() for v in state.values()]
    return tensor_bytes([*model.parameters(), *model.buffers(), *opt])


class RssSampler:
    """Samples this process's resident set size from /proc/self/statm every `interval` seconds."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def _run(self) -> None:
        if self.interval <= 0:
            return
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class ForeignLoad:
    """Share of all CPU time used by other processes while in the block, from /proc/stat and
    /proc/self/stat: a contention warning for shared machines (None where /proc is unavailable)."""

    def __init__(self):
        self.share: float | None = None

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # total, busy, own

    def __enter__(self) -> ForeignLoad:
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        if self._start is None or end is None or end[0] == self._start[0]:
            return
        total, busy, own = (e - s for e, s in zip(end, self._start))
        self.share = max(0.0, (busy - own) / total)


def wait_for_quiet(max_wait_s: float, threshold: float) -> float:
    """Sleep in 1 s windows until other processes use at most `threshold` of the CPUs (or time runs out).
    Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        with ForeignLoad() as load:
            time.sleep(1.0)
        if load.share is None or load.share <= threshold:
            break
    return time.perf_counter() - start


def release_free_heap() -> None:
    """Give glibc's cached free heap back to the OS so an RSS delta sees the step's allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the two implementations ---------------------------------------------------------------------------

class MaeframeStep:
    """maeframe's engine step (`maeframe.engine.step.TrainStep`, what `Pretrainer.train` calls once per
    optimizer step) over the recipe's model and components, without the data pipeline or run directory."""

    label = "maeframe"

    def __init__(self, prepared, runtime: Runtime, batch_size: int, compile_model: bool):
        recipe = prepared.recipe
        recipe.runtime.compile = compile_model  # MAEStep compiles the model when the recipe says so
        self.lr = peak_lr(recipe.optim, batch_size)
        self.engine = MAEStep(prepared, runtime, World(), self.lr, steps_per_epoch=1000)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.model.train()
        self.step = 0

    def train_step(self, batch: torch.Tensor) -> None:
        self.engine(self.step, [(batch, None)])
        self.step += 1

    def loss_for_flops(self, batch: torch.Tensor) -> torch.Tensor:
        compiled, self.engine.step_model = self.engine.step_model, self.model
        try:
            return self.engine.forward_losses(batch, step=self.step)[0]
        finally:
            self.engine.step_model = compiled


class HfStep:
    """transformers' ViTMAEForPreTraining (loss inside the model) with torch AdamW."""

    label = "hf-transformers"

    def __init__(self, prepared, runtime: Runtime, compile_model: bool, lr: float, fused: bool):
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        recipe = prepared.recipe
        z = reference_sizes(prepared)
        kwargs = dict(
            hidden_size=z["dim"], num_hidden_layers=z["depth"], num_attention_heads=z["heads"],
            intermediate_size=int(z["dim"] * z["mlp_ratio"]), hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, qkv_bias=True,
            image_size=z["image_size"], patch_size=z["patch"], num_channels=z["channels"],
            decoder_hidden_size=z["dec_dim"], decoder_num_hidden_layers=z["dec_depth"],
            decoder_num_attention_heads=z["dec_heads"],
            decoder_intermediate_size=int(z["dec_dim"] * z["mlp_ratio"]),
            mask_ratio=z["mask_ratio"], norm_pix_loss=z["norm_pix"],
        )
        try:
            config = ViTMAEConfig(**kwargs, attn_implementation="sdpa")
            self.model = ViTMAEForPreTraining(config)
        except (ValueError, ImportError):
            config = ViTMAEConfig(**kwargs)
            self.model = ViTMAEForPreTraining(config)
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.model.to(runtime.device).train()
        self.runtime, self.device = runtime, runtime.device
        mode = recipe.runtime.compile_mode
        self.step_model = torch.compile(self.model, mode=mode) if compile_model else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = recipe.optim
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                           fused=fused)

    def train_step(self, batch: torch.Tensor) -> None:
        with self.runtime.autocast():
            loss = self.step_model(pixel_values=batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss_for_flops(self, batch: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.model(pixel_values=batch).loss


def reference_sizes(prepared) -> dict:
    """The recipe's sizes as the references take them (square image and patch)."""
    recipe = prepared.recipe
    m, tok = recipe.model, recipe.tokenizer.options
    return dict(image_size=as_pair(tok["image_size"])[0], patch=as_pair(tok["patch_size"])[0], channels=tok["channels"],
                dim=m.embed_dim, depth=m.depth, heads=m.num_heads, dec_dim=m.decoder_embed_dim,
                dec_depth=m.decoder_depth, dec_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio,
                mask_ratio=recipe.masker.options.get("ratio", 0.75),
                norm_pix=bool(recipe.target.options.get("norm_pix", False)))


class OfficialStep:
    """The official MAE code's model and per-iteration work (benchmarks/official_mae.py), always eager: the
    official code has no torch.compile, fused attention or fused AdamW."""

    label = "official-mae"

    def __init__(self, prepared, runtime: Runtime, lr: float):
        optim = prepared.recipe.optim
        self.model = OfficialMae(**reference_sizes(prepared)).to(runtime.device).train()
        self.runtime, self.device = runtime, runtime.device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(official_param_groups(self.model, optim.weight_decay), lr=lr,
                                           betas=optim.betas)

    def train_step(self, batch: torch.Tensor) -> None:
        with self.runtime.autocast():
            loss = self.model(batch)[0]
        if not math.isfinite(loss.item()):
            raise RuntimeError("official reference: non-finite loss")
        loss.backward()
        official_grad_norm(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)

    def loss_for_flops(self, batch: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.model(batch)[0]


def reference_caveats(prepared) -> list[str]:
    """Ways in which the recipe is not what ViTMAEForPreTraining computes (the comparison is then loose)."""
    r = prepared.recipe
    notes = []
    if r.tokenizer.name != "image_patch":
        return [f"tokenizer {r.tokenizer.name!r} is not image_patch: no HF reference possible"]
    for key in ("image_size", "patch_size"):
        value = r.tokenizer.options[key]
        if not isinstance(value, int) and len(set(value)) != 1:
            return [f"non-square {key} {value}: no HF reference possible"]
    if r.masker.name != "random":
        notes.append(f"masker {r.masker.name!r} (HF masks uniformly at random)")
    if r.target.name != "pixel":
        notes.append(f"target {r.target.name!r} (HF predicts pixels)")
    if [loss.name for loss in r.losses] != ["mse"]:
        notes.append(f"losses {[loss.name for loss in r.losses]} (HF uses one masked MSE)")
    if r.model.drop_path:
        notes.append(f"drop_path {r.model.drop_path} (HF ViTMAE has none)")
    # any other model option away from its default is something ViTMAEConfig cannot express
    mapped = {"embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "drop_path"}
    for name, field in type(r.model).model_fields.items():
        value = getattr(r.model, name)
        if name not in mapped and value != field.default and not (
                isinstance(field.default, tuple) and tuple(value or ()) == field.default):
            if name.startswith("decoder_window") and r.model.model_dump().get("decoder_attention") == "global":
                continue  # window options only matter for local decoder attention
            notes.append(f"model.{name}={value!r} (HF ViTMAE has no such option)")
    return notes


# --- measuring -----------------------------------------------------------------------------------------

def _cpu_flash_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_flash_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


def _flop_mapping() -> dict:
    """CPU's fused attention kernels are missing from torch's FLOP registry; count them like CUDA's."""
    aten, mapping = torch.ops.aten, {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_fwd),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_bwd)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def count_flops(impl, batch: torch.Tensor) -> int:
    """FLOPs of one forward + backward (eager model; the optimizer's elementwise work is not counted)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    with counter:
        impl.loss_for_flops(batch).backward()
    impl.optimizer.zero_grad(set_to_none=True)
    sync(batch.device)
    return counter.get_total_flops()


def timed_round(impl, batch: torch.Tensor, steps: int, own_state: int, rss_interval: float) -> dict:
    """`steps` training steps; per-step times from CUDA events (GPU) or perf_counter (CPU)."""
    device = batch.device
    with ForeignLoad() as load:
        result = _timed_steps(impl, batch, steps, own_state, rss_interval)
    result["foreign_cpu_share"] = None if load.share is None else round(load.share, 3)
    return result


def _timed_steps(impl, batch: torch.Tensor, steps: int, own_state: int, rss_interval: float) -> dict:
    device = batch.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        others = torch.cuda.memory_allocated(device) - own_state
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        start = time.perf_counter()
        events[0].record()
        for i in range(steps):
            impl.train_step(batch)
            events[i + 1].record()
        sync(device)
        wall = time.perf_counter() - start
        step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        peak = torch.cuda.max_memory_allocated(device) - others
    else:
        release_free_heap()
        with RssSampler(rss_interval) as rss:
            before = RssSampler.rss()
            step_s = []
            start = time.perf_counter()
            for _ in range(steps):
                t0 = time.perf_counter()
                impl.train_step(batch)
                step_s.append(time.perf_counter() - t0)
            wall = time.perf_counter() - start
        peak = rss.peak - before if rss_interval > 0 else None
    return {"wall_s": wall, "step_s": step_s, "peak_bytes": peak}


KERNEL_KINDS = [  # (kind, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn_generated_fort_native_sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "splitk", "cublas")),
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("fused elementwise/norm (triton)", ("triton",)),
    ("elementwise/norm/reduce (eager)", ("elementwise", "reduce", "norm", "softmax", "gelu", "index", "gather",
                                        "scatter", "sort", "copy", "fill", "cat")),
]


def profile_steps(impl, batch: torch.Tensor, path: Path, steps: int = 5) -> dict:
    """Profile `steps` training steps; write the kernel table to `path` and return the device kernel time
    per step (`kernel_ms_per_step`) and each kind's share of it. The profiler slows the host, so wall
    time under it says nothing about idle gaps: compare `kernel_ms_per_step` with the timed step instead."""
    from torch.profiler import ProfilerActivity, profile

    device = batch.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            impl.train_step(batch)
        sync(device)
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(averages.table(sort_by=sort_key, row_limit=60, max_name_column_width=90) + "\n")
    if device.type != "cuda":
        return {}
    kinds: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other kernels")
        kinds[kind] = kinds.get(kind, 0.0) + event.time_range.elapsed_us()
    total = sum(kinds.values())
    shares = {k: round(v / total, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return {"kernel_ms_per_step": round(total / steps / 1e3, 3), "shares_of_kernel_time": shares}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed rounds per implementation, order alternating A B | B A | ...; "
                         "keep it even so that slow drift cancels (default 2)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile both models (default: the recipe's runtime.compile)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                    help="auto = bf16 autocast on CUDA, fp32 on CPU (default: the recipe's runtime.precision)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                    help="default: the recipe's runtime.device")
    ap.add_argument("--references", default="hf", help="comma-separated references timed beside maeframe: hf "
                    "(transformers ViTMAEForPreTraining), official (the official MAE code's computation, "
                    "benchmarks/official_mae.py, always eager); 'none' for maeframe alone")
    ap.add_argument("--no-reference", action="store_true", help="same as --references none")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="disable cuDNN's fused attention in SDPA for every implementation (an experiment)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after timing, profile 5 maeframe steps with torch.profiler and write the kernel table "
                         "here (text); the JSON gets the time shares by kernel kind")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (overrides the table)")
    ap.add_argument("--contention-threshold", type=float, default=0.05,
                    help="a round during which other processes used more than this share of all CPUs is contended")
    ap.add_argument("--contention-retries", type=int, default=3,
                    help="repeat a contended round up to this many times (0: keep it, only warn)")
    ap.add_argument("--wait-idle-s", type=float, default=0.0,
                    help="before each round, wait up to this long for other processes to go quiet (shared machines)")
    ap.add_argument("--rss-interval-ms", type=float, default=2.0,
                    help="CPU only: RSS sampling period during timed steps; 0 disables (no peak memory)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    overrides = list(args.overrides)
    prepared = prepare(args.recipe, overrides)
    recipe = prepared.recipe
    if recipe.task != "pretrain":
        ap.error(f"{args.recipe} is a {recipe.task!r} recipe; this benchmark times pretraining steps")
    runtime_config = recipe.runtime.model_copy()
    if args.precision is not None:
        runtime_config.precision = args.precision
    if args.device is not None:
        runtime_config.device = args.device
    runtime = select_runtime(runtime_config)
    if runtime.precision == "fp16":
        ap.error("fp16 needs a grad scaler on the reference side; benchmark bf16 or fp32")
    device = runtime.device
    batch_size = args.batch_size or recipe.data.batch_size
    compile_model = recipe.runtime.compile if args.compile is None else args.compile

    caveats = [] if args.no_reference else reference_caveats(prepared)
    wanted = set() if args.no_reference else {r for r in args.references.split(",") if r not in ("", "none")}
    if wanted - {"hf", "official"}:
        ap.error(f"--references: unknown {sorted(wanted - {'hf', 'official'})}; choose from hf, official, none")
    if args.no_cudnn_attention:  # then SDPA picks flash attention (or memory-efficient) kernels
        torch.backends.cuda.enable_cudnn_sdp(False)
    if any("no HF reference" in c for c in caveats):
        wanted = set()

    git_commit = _git_commit()
    loadavg = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    torch.manual_seed(recipe.seed)
    input_shape = tuple(prepared.components.tokenizer.input_shape)
    batch = torch.randn(batch_size, *input_shape, device=device)

    impls = [MaeframeStep(prepared, runtime, batch_size, compile_model)]
    if "hf" in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = bool(impls[0].optimizer.defaults.get("fused"))  # the same AdamW kernel as maeframe's
            impls.append(HfStep(prepared, runtime, compile_model, impls[0].lr, fused))
    if "official" in wanted:
        impls.append(OfficialStep(prepared, runtime, impls[0].lr))

    print(f"device {device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"precision {runtime.precision} | compile {compile_model} | batch {batch_size}", flush=True)
    for impl in impls:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            impl.train_step(batch)
        sync(device)
        print(f"  warmup {impl.label}: {args.warmup} steps in {time.perf_counter() - t0:.1f} s", flush=True)

    flops = {impl.label: count_flops(impl, batch) for impl in impls}
    states = {impl.label: state_bytes(impl.model, impl.optimizer) for impl in impls}
    rounds: dict[str, list[dict]] = {impl.label: [] for impl in impls}
    discarded = {impl.label: 0 for impl in impls}
    for r in range(args.repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            for attempt in range(args.contention_retries + 1):
                wait_for_quiet(args.wait_idle_s, args.contention_threshold)
                res = timed_round(impl, batch, args.steps, states[impl.label], args.rss_interval_ms / 1e3)
                busy = res["foreign_cpu_share"] or 0.0
                contended = busy > args.contention_threshold
                retry = contended and attempt < args.contention_retries
                print(f"  round {r + 1} {impl.label}: {batch_size * args.steps / res['wall_s']:.1f} img/s"
                      + (f"  (other processes used {100 * busy:.0f}% of the CPUs)" if busy >= 0.01 else "")
                      + ("  -> discarded, repeating" if retry else ""), flush=True)
                if not retry:
                    break
                discarded[impl.label] += 1
            rounds[impl.label].append(res)

    peak, peak_source = peak_flops(device, runtime.precision, args.peak_tflops)
    results = {}
    for impl in impls:
        rs = rounds[impl.label]
        img_s = batch_size * args.steps * len(rs) / sum(r["wall_s"] for r in rs)
        best_img_s = batch_size * args.steps / min(r["wall_s"] for r in rs)
        all_steps = [s for r in rs for s in r["step_s"]]
        gflop_img = flops[impl.label] / batch_size / 1e9
        achieved = flops[impl.label] / batch_size * img_s
        results[impl.label] = {
            "img_s": round(img_s, 2),
            "steps_s": round(img_s / batch_size, 3),
            "img_s_best_round": round(best_img_s, 2),
            "step_ms_median": round(1e3 * statistics.median(all_steps), 3),
            "step_ms_min": round(1e3 * min(all_steps), 3),
            "img_s_per_round": [round(batch_size * args.steps / r["wall_s"], 2) for r in rs],
            "foreign_cpu_share_per_round": [r["foreign_cpu_share"] for r in rs],
            "contended_rounds_discarded": discarded[impl.label],
            "gflop_per_img": round(gflop_img, 4),
            "achieved_tflops": round(achieved / 1e12, 4),
            "mfu": None if peak is None else round(achieved / peak, 4),
            "peak_mem_mb": (None if any(r["peak_bytes"] is None for r in rs)
                            else round(max(r["peak_bytes"] for r in rs) / MB, 1)),
            "state_mb": round(states[impl.label] / MB, 1),
            "trainable_params": sum(p.numel() for p in impl.model.parameters() if p.requires_grad),
            "adamw_fused": bool(impl.optimizer.defaults.get("fused")),
        }
        if isinstance(impl, HfStep):
            results[impl.label]["attn_implementation"] = impl.attn_implementation

    ratios = {f"maeframe/{impl.label}": round(results["maeframe"]["img_s"] / results[impl.label]["img_s"], 3)
              for impl in impls[1:]}
    kernel_shares = profile_steps(impls[0], batch, args.profile) if args.profile else None
    report = {
        "benchmark": "pretrain_step",
        "device": device_name(device),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "transformers": _transformers_version(), "maeframe": maeframe.__version__,
                     "cuda": torch.version.cuda if device.type == "cuda" else None},
        "git_commit": git_commit,
        "recipe": str(args.recipe),
        "recipe_name": recipe.name,
        "overrides": overrides,
        "model": recipe.model.model_dump(),
        "input_shape": list(input_shape),
        "num_tokens": prepared.components.tokenizer.spec.num_tokens,
        "batch_size": batch_size,
        "precision": runtime.precision,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "compile": compile_model,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "order": ("rounds alternate A,B | B,A | A,B ...; img/s = all timed images / all timed seconds "
                  "(with an even number of rounds linear drift cancels); step ms = median over all timed steps"),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "memory_method": ("cuda: max_memory_allocated over the implementation's timed steps (reset per round) "
                          "minus memory held by everything else, i.e. own state + step peak"
                          if device.type == "cuda" else
                          f"cpu: peak RSS sampled every {args.rss_interval_ms:g} ms during the timed steps minus RSS just before them "
                          "(after malloc_trim); a delta estimate that excludes weights and optimizer state"),
        "loadavg_at_start": loadavg,
        "max_foreign_cpu_share": max((r["foreign_cpu_share"] or 0.0 for rs in rounds.values() for r in rs), default=0.0),
        "contention_threshold": args.contention_threshold,
        "reference_caveats": caveats,
        "implementations": results,
        "compile_mode": recipe.runtime.compile_mode if compile_model else None,
        "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),
        "ratios_img_s": ratios,
        "ratio_img_s_maeframe_over_hf": ratios.get("maeframe/hf-transformers"),
        "profile_kernels": kernel_shares,
    }
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


def _git_commit() -> str | None:
    """HEAD of the checkout, '+dirty' when tracked files differ from it (best effort)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def print_table(report: dict) -> None:
    cols = ["implementation", "img/s", "steps/s", "step ms (med)", "GFLOP/img", "TFLOP/s", "MFU", "peak MB",
            "state MB", "params"]
    rows = []
    for name, r in report["implementations"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append([name, f"{r['img_s']:.1f}", f"{r['steps_s']:.3f}", f"{r['step_ms_median']:.1f}",
                     f"{r['gflop_per_img']:.3f}", f"{r['achieved_tflops']:.3f}", mfu,
                     "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
                     f"{r['state_mb']:.0f}", f"{r['trainable_params'] / 1e6:.2f}M"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print()
    print(f"{report['recipe_name']} {' '.join(report['overrides'])}".strip())
    print(f"{report['device']} | {report['torch_threads']} threads | {report['precision']} | "
          f"compile={report['compile']} | batch {report['batch_size']}")
    print(line(cols))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    for name, ratio in report["ratios_img_s"].items():
        print(f"{name} img/s: {ratio:.3f}")
    profile = report["profile_kernels"]
    if profile:
        step_ms = report["implementations"]["maeframe"]["step_ms_median"]
        print(f"profile: device kernels {profile['kernel_ms_per_step']:.1f} ms per step of {step_ms:.1f} ms "
              f"(GPU busy {100 * profile['kernel_ms_per_step'] / step_ms:.0f}%); shares of kernel time:")
        for kind, share in profile["shares_of_kernel_time"].items():
            print(f"  {kind} {100 * share:.1f}%")
    for note in report["reference_caveats"]:
        print(f"reference caveat: {note}")
    if report["max_foreign_cpu_share"] > report["contention_threshold"]:
        print(f"WARNING: other processes used up to {100 * report['max_foreign_cpu_share']:.0f}% of the CPUs "
              "during timed rounds; the figures are contended")
    if report["peak_flops"] is None:
        print(f"MFU: {report['peak_flops_source']}")
    print()


if __name__ == "__main__":
    main()
