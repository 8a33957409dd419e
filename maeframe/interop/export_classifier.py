"""Export a fine-tuned (or linear-probed) classifier for inference without maeframe: TorchScript, ONNX and
torch.export.

The files take what the run's eval dataset yields -- a batch of normalised inputs [B, *input_shape],
e.g. [B, 1, 28, 28] for Fashion-MNIST -- and return logits [B, classes]; the batch size is free. Each
export is checked against the PyTorch model on the same random batch (max abs difference <= atol,
1e-4 by default) before this returns. `classifier.json` records the classes, input shape and
normalisation.

ONNX uses `torch.onnx.export(dynamo=True)`, which needs the `onnx` and `onnxscript` packages, and the
check needs `onnxruntime` (pip install onnx onnxscript onnxruntime). torch.export writes `classifier.pt2`
(`torch.export.save`; load it with `torch.export.load(path).module()`), an ExportedProgram whose batch
dimension is dynamic (`torch.export.Dim`); it needs torch >= 2.4 (maeframe's minimum) and nothing else.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.checkpoint import load_checkpoint
from ..model.classifier import Classifier, TokenizedClassifier
from .encoder_weights import encoder_layout
from .official_mae import InteropError


def load_classifier(checkpoint: str | Path, ema: bool = False) -> tuple[TokenizedClassifier, dict[str, Any]]:
    """A finetune/linprobe checkpoint -> (TokenizedClassifier in eval mode on the CPU, facts for classifier.json)."""
    from ..build import prepare
    from ..recipe import RECIPE_ADAPTER

    state = load_checkpoint(checkpoint)
    task = state.get("task", "pretrain")
    if task not in ("finetune", "linprobe"):
        raise InteropError(f"{checkpoint}: a {task} checkpoint holds no classifier; export a finetune or linprobe "
                           f"run's last.pt / best.pt (`maeframe export` writes a pretrained encoder for timm)")
    recipe = RECIPE_ADAPTER.validate_python(state["recipe"])
    prepared = prepare(recipe)
    tokenizer, head = prepared.components.tokenizer, recipe.head
    classes = state["classes"]
    model = Classifier(tokenizer.spec, recipe.model, len(classes), head.pool, bn_head=task == "linprobe",
                       features=head.features, layout=encoder_layout(prepared.components.weight_format, recipe.init))
    weights = state["ema"] if ema else state["model"]
    if weights is None:
        raise InteropError(f"{checkpoint}: the run kept no EMA weights")
    model.load_state_dict(weights)
    data_options = recipe.data.eval.options
    facts = {"task": task, "name": recipe.name, "step": state["step"], "weights": "ema" if ema else "model",
             "classes": classes, "input_shape": list(tokenizer.input_shape), "multi_label": head.multi_label,
             "mean": data_options.get("mean"), "std": data_options.get("std"), "output": "logits"}
    return TokenizedClassifier(tokenizer, model).eval(), facts


def _example(model: TokenizedClassifier, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.tokenizer.input_shape, generator=generator)


def export_torchscript(model: TokenizedClassifier, path: Path) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning: the tokenizer's shape check is traced as a constant
        traced = torch.jit.trace(model, _example(model, 2), check_trace=False)
    traced.save(str(path))
    return path


def export_onnx(model: TokenizedClassifier, path: Path, opset: int = 18) -> Path:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; a clear message if absent)
    except ImportError as err:
        raise InteropError("ONNX export needs `pip install onnx onnxscript` (and onnxruntime to check it)") from err
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (_example(model, 2),), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=["inputs"], output_names=["logits"],
                                    dynamic_shapes={"inputs": {0: batch}}, external_data=False)
    program.save(str(path))
    return path


def export_torch_export(model: TokenizedClassifier, path: Path) -> Path:
    """`torch.export.export` with a dynamic batch dimension, saved with `torch.export.save` (atomically)."""
    export = torch.export
    if not all(hasattr(export, name) for name in ("export", "Dim", "save", "load")):  # torch < 2.4 lacks some
        raise InteropError(f"torch.export with dynamic shapes (torch.export.Dim, save, load) needs torch >= 2.4; "
                           f"this is torch {torch.__version__}; leave it out with --skip torch_export")
    batch = export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = export.export(model, (_example(model, 2),), dynamic_shapes=({0: batch},), strict=False)
        except Exception as err:  # torch raises several types (UserError, GuardOnDataDependentSymNode, ...)
            first = (str(err).strip().splitlines() or [""])[0]
            raise InteropError(f"torch.export.export failed on this classifier ({type(err).__name__}: {first}); "
                               f"leave it out with --skip torch_export") from err
    return _atomic_write(path, lambda tmp: export.save(program, tmp))


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """`write(tmp)` a temporary sibling of `path` (same suffix: torch.export.save wants .pt2), then rename it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_exports(model: TokenizedClassifier, torchscript: Path | None, onnx: Path | None, batch: int = 3,
                  atol: float = 1e-4, exported: Path | None = None) -> dict[str, float]:
    """Max abs difference of each export's logits from the PyTorch model's on a batch the exports were not
    traced with (another size too). Raises InteropError above `atol`."""
    inputs = _example(model, batch, seed=1)
    with torch.no_grad():
        expected = model(inputs)
    diffs: dict[str, float] = {}
    if torchscript is not None:
        with torch.no_grad():
            got = torch.jit.load(str(torchscript))(inputs)
        diffs["torchscript"] = (got - expected).abs().max().item()
    if onnx is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
        diffs["onnx"] = (got - expected).abs().max().item()
    if exported is not None:
        with torch.no_grad():
            got = torch.export.load(str(exported)).module()(inputs)
        diffs["torch_export"] = (got - expected).abs().max().item()
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise InteropError(f"exported model differs from PyTorch beyond {atol}: {bad}")
    return diffs


FORMATS = ("torchscript", "onnx", "torch_export")


def export_classifier(checkpoint: str | Path, out_dir: str | Path, formats: tuple[str, ...] = FORMATS,
                      ema: bool = False, atol: float = 1e-4) -> dict[str, Any]:
    """Write <out_dir>/classifier.pt (TorchScript), classifier.onnx, classifier.pt2 (torch.export) and
    classifier.json; check every export against the PyTorch model. Returns the facts written to
    classifier.json (with the max differences)."""
    model, facts = load_classifier(checkpoint, ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scripted = export_torchscript(model, out / "classifier.pt") if "torchscript" in formats else None
    onnx = export_onnx(model, out / "classifier.onnx") if "onnx" in formats else None
    program = export_torch_export(model, out / "classifier.pt2") if "torch_export" in formats else None
    facts["max_abs_diff"] = check_exports(model, scripted, onnx, atol=atol, exported=program)
    facts["files"] = [p.name for p in (scripted, onnx, program) if p is not None]
    _atomic_write(out / "classifier.json", lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=2) + "\n"))
    return facts
