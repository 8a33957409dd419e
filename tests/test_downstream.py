"""Downstream evaluation: fine-tuning, linear probing and k-NN recipes on real Fashion-MNIST (tiny sizes),
their metrics and results.json, exact resume, and the TorchScript/ONNX classifier export."""
import json
import os
import signal

import pytest
import torch
from timm.optim import Lars, param_groups_layer_decay

from maeframe.build import build_dataset, prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.engine.data import SeededDataset
from maeframe.engine.run import run_task
from maeframe.engine.finetune import ClassifierStep, FineTuner
from maeframe.model.classifier import Classifier, layer_id
from maeframe.engine.knn import knn_scores
from maeframe.engine.linprobe import LinearProbe
from maeframe.engine.metrics import (average_precision, confusion_matrix, mean_average_precision,
                                     per_class_accuracy, topk_accuracy)
from maeframe.engine.pretrain import Pretrainer
from maeframe.engine.loop import Preempted
from maeframe.errors import MaeframeError, RecipeError
from maeframe.interop import maeframe_to_official
from maeframe.model.pos_embed import sincos_pos_embed
from maeframe.recipe import (AugmentConfig, EncoderConfig, FinetuneRecipe, KnnRecipe, LinprobeRecipe, Recipe,
                             load_recipe)
from maeframe.tokenizer import TokenSpec
from conftest import QUICKSTART, RECIPES, tiny

FINETUNE, LINPROBE, KNN = (RECIPES / f"{task}_fmnist.yaml" for task in ("finetune", "linprobe", "knn"))
ENCODER = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
DATA = ["data.train.options.limit=64", "data.eval.options.limit=32", "data.batch_size=16", "data.num_workers=0"]
RUNTIME = ["runtime.progress_bar=false", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny quickstart pretraining run (32 wide, 1 block, 8 steps): its last.pt."""
    out = tmp_path_factory.mktemp("pretrain")
    Pretrainer(prepare(QUICKSTART, tiny(out))).train()
    return out / "quickstart" / "last.pt"


def overrides(tmp_path, checkpoint, *extra, train=True):
    schedule = ["optim.epochs=2", "optim.warmup_epochs=1", "runtime.log_interval=1"] if train else []
    return [*ENCODER, *DATA, *RUNTIME, *schedule, f"runtime.output_dir={tmp_path}", f"init.checkpoint={checkpoint}",
            *extra]


def encoder_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


# --- recipes ---------------------------------------------------------------------------------------------

def test_task_union_picks_the_schema_and_keeps_field_paths():
    assert type(load_recipe(QUICKSTART)) is Recipe
    assert type(load_recipe(FINETUNE)) is FinetuneRecipe
    assert type(load_recipe(LINPROBE)) is LinprobeRecipe
    assert type(load_recipe(KNN)) is KnnRecipe
    cases = [(FINETUNE, "optim.epochz=3", "optim.epochz", "Extra inputs"),
             (FINETUNE, "task=regress", "task", "task must be one of pretrain, finetune, linprobe, knn"),
             (FINETUNE, "init.format=official", "init.format", "registered weight_formats: hf, hf_videomae, maeframe, official_audiomae, official_mae, official_videomae"),
             (FINETUNE, "init.checkpoint=null", "init", "needs a checkpoint path"),
             (FINETUNE, "data.batch_size=15", "data.batch_size", "even batch size"),
             (FINETUNE, "augment.rand_augment=rand-m9-zz3", "augment.rand_augment", "not a timm RandAugment spec"),
             (FINETUNE, "masker.name=random", "masker", "Extra inputs"),
             (LINPROBE, "optim.layer_decay=0.5", "optim.layer_decay", "Extra inputs"),
             (LINPROBE, "head.features=pixels", "head.features", "set init.format: none"),
             (KNN, "knn.k=0", "knn.k", "greater than 0"),
             (KNN, "data.train.options.split=dev", "data.train.options.split", "should match")]
    for path, override, field, message in cases:
        with pytest.raises(RecipeError) as err:
            prepare(path, [override])
        assert field in [p for p, _ in err.value.problems], (override, err.value.problems)
        assert message in str(err.value), (override, str(err.value))


def test_downstream_recipes_need_an_eval_set(tmp_path):
    text = KNN.read_text()
    start, end = text.index("\n  eval:") + 1, text.index("  batch_size:")
    (tmp_path / "no_eval.yaml").write_text(text[:start] + text[end:])
    with pytest.raises(RecipeError) as err:
        prepare(tmp_path / "no_eval.yaml")
    assert ("data.eval", "Field required") in err.value.problems


def test_paper_recipes_hold_the_reference_settings():
    for key, epochs, blr, decay, drop_path, dim in [("vitb", 100, 5e-4, 0.65, 0.1, 768),
                                                    ("vitl", 50, 1e-3, 0.75, 0.2, 1024),
                                                    ("vith", 50, 1e-3, 0.75, 0.3, 1280)]:
        recipe = load_recipe(RECIPES / f"finetune_{key}.yaml")
        assert (recipe.optim.epochs, recipe.optim.base_lr, recipe.optim.layer_decay) == (epochs, blr, decay)
        assert (recipe.model.drop_path, recipe.model.embed_dim) == (drop_path, dim)
        assert recipe.data.batch_size * recipe.optim.accum_steps == 1024
        assert (recipe.optim.warmup_epochs, recipe.optim.weight_decay, recipe.optim.betas) == (5, 0.05, (0.9, 0.999))
        assert recipe.augment == AugmentConfig()  # mixup 0.8, cutmix 1.0, smoothing 0.1, rand-m9-mstd0.5-inc1, 0.25
        assert recipe.head.pool == "avg" and recipe.head.init_std == 2e-5
    probe = load_recipe(RECIPES / "linprobe_vitb.yaml")
    assert probe.data.batch_size * probe.optim.accum_steps == 16384
    assert (probe.optim.base_lr, probe.optim.epochs, probe.optim.warmup_epochs, probe.optim.weight_decay) == (0.1, 90, 10, 0)
    knn = load_recipe(RECIPES / "knn_vitb.yaml").knn
    assert (knn.k, knn.temperature) == (20, 0.07)
    for path in (FINETUNE, LINPROBE, KNN):
        assert load_recipe(path).init.checkpoint == "runs/quickstart/last.pt"


# --- pieces ------------------------------------------------------------------------------------------------

def test_layer_ids_and_layer_decay_per_block():
    spec = TokenSpec((7, 7), (4, 4), 1)
    model = Classifier(spec, EncoderConfig(embed_dim=32, depth=3, num_heads=2), num_classes=10)
    assert [layer_id(n, 3) for n in ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.weight",
                                     "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.2.mlp.fc2.bias",
                                     "encoder.norm.weight", "fc_norm.weight", "head.weight")] == [0, 0, 0, 1, 3, 4, 4, 4]
    groups = param_groups_layer_decay(model, 0.05, no_weight_decay_list=["encoder.cls_token"], layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {"encoder.patch_embed.weight": (0.5 ** 4, 0.05), "encoder.cls_token": (0.5 ** 4, 0.0),
              "encoder.blocks.0.attn.qkv.weight": (0.5 ** 3, 0.05), "encoder.blocks.1.norm1.weight": (0.5 ** 2, 0.0),
              "encoder.blocks.2.mlp.fc1.weight": (0.5, 0.05), "fc_norm.weight": (1.0, 0.0), "head.weight": (1.0, 0.05),
              "head.bias": (1.0, 0.0)}
    for name, value in expect.items():
        assert scale[id(named[name])] == pytest.approx(value), name
    assert len(scale) == len(named)


def test_metrics_on_known_values(tmp_path):
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1, 2, 2])
    assert topk_accuracy(scores, labels, (1, 2, 5)) == {"top1": 75.0, "top2": 100.0}
    matrix = confusion_matrix(scores.argmax(1), labels, 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert per_class_accuracy(matrix) == [100.0, 100.0, 50.0]
    # class 0: positives ranked 1 and 3 -> AP (1 + 2/3) / 2; class 1: none -> NaN; class 2: ranked 2 -> 1/2
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    multi = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.2, 0.6], [0.1, 0.3, 0.2], [0.0, 0.4, 0.9]])
    ap = average_precision(multi, targets)
    assert ap[0].item() == pytest.approx(5 / 6) and ap[1].isnan() and ap[2].item() == pytest.approx(0.5)
    assert mean_average_precision(multi, targets) == pytest.approx(100 * (5 / 6 + 0.5) / 2)


def test_rand_augment_and_erasing_on_grayscale_are_seeded():
    prepared = prepare(FINETUNE, ["data.train.options.limit=8"])
    plain = SeededDataset(build_dataset(prepared, "train"))
    augment = prepared.recipe.augment
    augmented = build_dataset(prepared, "train")
    augmented.use_finetune_augment(augment.rand_augment, augment.random_erasing)  # the dataset's own protocol
    augmented = SeededDataset(augmented)
    first = [augmented[(i, 100 + i)][0] for i in range(8)]
    assert all(x.shape == (1, 28, 28) for x in first)
    assert all(torch.equal(a, augmented[(i, 100 + i)][0]) for i, a in enumerate(first))
    assert any(not torch.equal(a, plain[(i, 100 + i)][0]) for i, a in enumerate(first))


# --- runs -------------------------------------------------------------------------------------------------

def test_finetune_from_a_maeframe_checkpoint_writes_results(tmp_path, pretrained, capsys):
    trainer = FineTuner(prepare(FINETUNE, overrides(tmp_path, pretrained)))
    ours = encoder_weights(trainer.model.state_dict())
    theirs = load_checkpoint(pretrained)["model"]
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert trainer.unused_keys == ["encoder.norm.weight", "encoder.norm.bias"]  # avg pooling uses fc_norm
    assert trainer.model.linear.weight.std() < 1e-4  # trunc-normal 2e-5 head
    assert [g["lr_scale"] for g in trainer.optimizer.param_groups] == pytest.approx(
        [0.75 ** 2] * 2 + [0.75] * 2 + [1.0] * 2)  # layers 0 (patch embed, cls), 1 (block), 2 (fc_norm, head)
    results = trainer.train()
    run = tmp_path / "finetune_fmnist"
    saved = json.loads((run / "results.json").read_text())
    assert saved["task"] == "finetune" and saved["complete"] and saved["step"] == 8
    assert saved["dataset"] == {"train": 64, "eval": 32, "num_classes": 10}
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert {"top1", "top5", "loss", "per_class_accuracy", "confusion_matrix"} <= set(saved["final"])
    assert 0 <= saved["final"]["top1"] <= saved["final"]["top5"] <= 100
    assert sum(map(sum, saved["final"]["confusion_matrix"])) == 32
    assert list(saved["final"]["per_class_accuracy"])[:2] == ["T-shirt/top", "Trouser"]
    assert saved["best"]["metric"] == "top1" and saved["best"]["value"] == max(h["top1"] for h in saved["history"])
    assert results["final"]["top1"] == saved["final"]["top1"]
    from PIL import Image

    assert Image.open(run / "confusion_matrix.png").size[0] > 300
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run / name)["task"] == "finetune"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/top1" in line for line in lines) == 2 and sum("loss" in line for line in lines) == 8
    assert "finetune finetune_fmnist (init maeframe): top1" in capsys.readouterr().out


def test_finetune_from_an_official_layout_checkpoint(tmp_path, pretrained):
    state = load_checkpoint(pretrained)
    spec = prepare(QUICKSTART).components.tokenizer.spec
    torch.save({"model": maeframe_to_official(state["model"], spec)}, tmp_path / "mae.pth")
    trainer = FineTuner(prepare(FINETUNE, overrides(tmp_path, tmp_path / "mae.pth", "init.format=official_mae",
                                                    "runtime.max_steps=1")))
    for key, value in encoder_weights(trainer.model.state_dict()).items():
        assert torch.allclose(value, state["model"][key], atol=1e-7), key
    trainer.train()


def test_init_none_is_a_seeded_random_encoder(tmp_path, pretrained):
    def weights(seed):
        return encoder_weights(FineTuner(prepare(FINETUNE, overrides(
            tmp_path / str(seed), pretrained, "init.format=none", f"seed={seed}"))).model.state_dict())

    a, b, c = weights(0), weights(0), weights(1)
    trained = load_checkpoint(pretrained)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.blocks.0.attn.qkv.weight"], c["encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["encoder.blocks.0.attn.qkv.weight"], trained["encoder.blocks.0.attn.qkv.weight"])


def test_finetune_at_another_resolution_recomputes_positions(tmp_path, pretrained):
    """Pretrained at 28² (7×7 tokens of 4²), fine-tuned at 32² (8×8 tokens): same weights, new sin-cos grid."""
    trainer = FineTuner(prepare(FINETUNE, overrides(tmp_path, pretrained, "tokenizer.options.image_size=32",
                                                    "runtime.max_steps=2")))
    encoder = trainer.model.encoder
    assert encoder.grid == (8, 8)
    assert torch.equal(encoder.pos_embed[0], sincos_pos_embed((8, 8), 32))
    assert torch.equal(encoder.patch_embed.weight, load_checkpoint(pretrained)["model"]["encoder.patch_embed.weight"])
    assert trainer.train()["dataset"]["eval"] == 32


def test_mismatched_encoder_and_missing_checkpoint_are_clear(tmp_path, pretrained):
    with pytest.raises(ValueError, match="model.num_heads: the checkpoint's encoder has 2, the recipe 4"):
        FineTuner(prepare(FINETUNE, overrides(tmp_path, pretrained, "model.num_heads=4")))
    with pytest.raises(ValueError, match=r"tokenizer.options.patch_size: .* pretrained with 4, the recipe has 7"):
        FineTuner(prepare(FINETUNE, overrides(tmp_path, pretrained, "tokenizer.options.patch_size=7")))
    with pytest.raises(FileNotFoundError, match="maeframe run recipes/quickstart.yaml"):
        FineTuner(prepare(FINETUNE, overrides(tmp_path, tmp_path / "absent.pt")))


def test_linprobe_keeps_the_encoder_frozen(tmp_path, pretrained):
    trainer = LinearProbe(prepare(LINPROBE, overrides(tmp_path, pretrained)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert isinstance(trainer.optimizer, Lars)
    assert isinstance(trainer.model.head[0], torch.nn.BatchNorm1d) and not trainer.model.head[0].affine
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if not n.startswith("head."))
    trainer.model.train()
    assert not trainer.model.encoder.training and trainer.model.head.training
    results = trainer.train()
    after = trainer.model.state_dict()
    frozen = [k for k in before if not k.startswith("head.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # encoder and fc_norm unchanged
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])  # the probe learned
    assert not torch.equal(before["head.0.running_mean"], after["head.0.running_mean"])
    assert results["task"] == "linprobe" and len(results["history"]) == 2


def test_knn_recipe_end_to_end_matches_a_direct_computation(tmp_path, pretrained):
    run = run_task(prepare(KNN, overrides(tmp_path, pretrained, train=False)))
    assert run["task"] == "knn" and run["feature_dim"] == 32 and run["dataset"]["train"] == 64
    assert (tmp_path / "knn_fmnist" / "confusion_matrix.png").is_file()
    # the raw-pixel baseline has a known answer: k-NN on the flat normalised images
    pixels = run_task(prepare(KNN, overrides(tmp_path, pretrained, "init.format=none", "knn.features=pixels",
                                                   "name=pixels", "knn.k=5", train=False)))
    prepared = prepare(KNN, overrides(tmp_path, pretrained, train=False))
    bank = build_dataset(prepared, "train", augment=False)
    queries = build_dataset(prepared, "eval")
    flat = lambda d: torch.stack([d[i][0].flatten() for i in range(len(d))])  # noqa: E731
    scores = knn_scores(flat(bank), bank.labels, flat(queries), k=5, temperature=0.07, num_classes=10)
    assert pixels["final"]["top1"] == pytest.approx(100 * (scores.argmax(1) == queries.labels).float().mean().item())
    assert pixels["feature_dim"] == 784
    saved = json.loads((tmp_path / "pixels" / "results.json").read_text())
    assert saved["final"]["top1"] == pixels["final"]["top1"] and saved["k"] == 5


def test_knn_never_overwrites_an_existing_run(tmp_path, pretrained):
    """Like every task: a second run under the same name is refused before anything is written."""
    run_task(prepare(KNN, overrides(tmp_path, pretrained, train=False)))
    results = (tmp_path / "knn_fmnist" / "results.json").read_text()
    with pytest.raises(MaeframeError, match="already holds a run"):
        run_task(prepare(KNN, overrides(tmp_path, pretrained, "knn.k=3", train=False)))
    assert (tmp_path / "knn_fmnist" / "results.json").read_text() == results
    with pytest.raises(MaeframeError, match="a knn run trains nothing"):
        run_task(prepare(KNN, overrides(tmp_path, pretrained, train=False)), resume=True)


def test_finetune_resume_is_exact(tmp_path, pretrained):
    """Mixup/cutmix, RandAugment, erasing, drop path and EMA all draw random numbers; a run stopped
    mid-epoch and resumed must match an uninterrupted one exactly."""
    extra = ["model.drop_path=0.2", "ema.decay=0.9"]

    def run(folder, *more, resume=False):
        trainer = FineTuner(prepare(FINETUNE, overrides(tmp_path / folder, pretrained, *extra, *more)), resume=resume)
        return trainer, trainer.train()

    straight, results = run("a")
    run("b", "runtime.max_steps=3")
    resumed, resumed_results = run("b", resume=True)
    lines = lambda folder: [{k: v for k, v in json.loads(line).items() if k not in ("time", "img_s", "data_wait")}  # noqa: E731
                            for line in (tmp_path / folder / "finetune_fmnist" / "metrics.jsonl").read_text().splitlines()]
    assert lines("a") == lines("b")
    assert results["history"] == resumed_results["history"] and results["final"] == resumed_results["final"]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key


def test_finetune_preemption_writes_last_and_resumes_exactly(tmp_path, pretrained, monkeypatch):
    """SIGTERM during step 3 (as a scheduler sends it): last.pt at the step boundary, exit code 75 through
    `Preempted`, and the resumed run equals an uninterrupted one."""
    def run(folder, resume=False):
        return FineTuner(prepare(FINETUNE, overrides(tmp_path / folder, pretrained)), resume=resume)

    straight = run("a").train()
    real_step = ClassifierStep.__call__

    def step_then_signal(self, step, micro):
        out = real_step(self, step, micro)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ClassifierStep, "__call__", step_then_signal)
    with pytest.raises(Preempted, match="stopped by signal SIGTERM at step 3") as stopped:
        run("b").train()
    assert stopped.value.exit_code == 75 and load_checkpoint(tmp_path / "b" / "finetune_fmnist" / "last.pt")["step"] == 3
    monkeypatch.undo()
    assert run("b", resume=True).train()["final"] == straight["final"]


def test_finetune_counts_unreadable_samples(tmp_path, pretrained, monkeypatch):
    real = SeededDataset.__getitem__
    monkeypatch.setattr(SeededDataset, "__getitem__",  # every sample reports one failed read before it
                        lambda self, item: (*real(self, item)[:2], 1))
    with pytest.raises(MaeframeError, match="sample reads failed.*data.max_bad_fraction=0.01"):
        FineTuner(prepare(FINETUNE, overrides(tmp_path / "a", pretrained))).train()
    trainer = FineTuner(prepare(FINETUNE, overrides(tmp_path / "b", pretrained, "data.max_bad_fraction=0.6")))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "b" / "finetune_fmnist" / "metrics.jsonl").read_text().splitlines()]
    assert [line["bad_samples"] for line in lines if "loss" in line][:2] == [16, 32]


def test_export_torchscript_onnx_and_torch_export_match_pytorch(tmp_path, pretrained, capsys):
    from maeframe.interop.export_classifier import load_classifier  # onnx, onnxscript, onnxruntime: dev extra

    FineTuner(prepare(FINETUNE, overrides(tmp_path, pretrained, "head.init_std=0.5", "runtime.max_steps=2"))).train()
    checkpoint = tmp_path / "finetune_fmnist" / "last.pt"
    assert main(["export-classifier", str(checkpoint), str(tmp_path / "export")]) == 0
    assert "checked: torchscript max |diff|" in capsys.readouterr().out
    facts = json.loads((tmp_path / "export" / "classifier.json").read_text())
    assert facts["input_shape"] == [1, 28, 28] and len(facts["classes"]) == 10 and facts["mean"] == [0.286]
    model, _ = load_classifier(checkpoint)
    inputs = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(inputs)
    assert expected.abs().max() > 0.1  # non-trivial logits, so equality means something
    scripted = torch.jit.load(str(tmp_path / "export" / "classifier.pt"))
    assert torch.allclose(scripted(inputs), expected, atol=1e-4)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "classifier.onnx"))
    got = torch.from_numpy(session.run(None, {"inputs": inputs.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4)
    assert facts["files"] == ["classifier.pt", "classifier.onnx", "classifier.pt2"]
    assert facts["max_abs_diff"]["torch_export"] <= 1e-4
    program = torch.export.load(str(tmp_path / "export" / "classifier.pt2")).module()
    assert torch.allclose(program(inputs), expected, atol=1e-4)  # batch 5: the exports were traced with 2
    assert torch.allclose(program(inputs[:1]), expected[:1], atol=1e-4)
    assert main(["export-classifier", str(tmp_path / "finetune_fmnist" / "last.pt"), str(tmp_path / "x"), "--ema"]) == 2


def test_cli_runs_a_downstream_recipe(tmp_path, pretrained, capsys):
    assert main(["run", str(KNN), *overrides(tmp_path, pretrained, train=False)]) == 0
    assert "knn knn_fmnist (init maeframe): top1" in capsys.readouterr().out
    assert main(["export-classifier", str(pretrained), str(tmp_path / "x")]) == 2
    assert "holds no classifier" in capsys.readouterr().err


def test_export_classifier_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export-classifier", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "TorchScript" in out and "torch.export" in out and "torch_export" in out


def class_folders(root, classes, per_class=6):
    """root/<class>/NN.png: each class a bright band at its own height with a little noise, so pixel
    directions (cosine k-NN) tell classes apart."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        band = "abcde".index(name) * 5
        for i in range(per_class):
            pixels = torch.full((28, 28), 20) + torch.randint(0, 6, (28, 28), generator=generator)
            pixels[band:band + 5] += 200
            pixels = pixels.clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:02d}.png")


def test_eval_labels_follow_the_training_classes_by_name(tmp_path):
    """An eval folder holding a subset of the classes numbers them 0, 1, ... itself; its labels are mapped to
    the training set's classes by name (k-NN on pixels: every query right, per-class figures on the right
    classes), and an eval class the training set lacks is an error naming it. The same in fine-tuning."""
    class_folders(tmp_path / "train", "abcd")
    class_folders(tmp_path / "eval", "bd")
    class_folders(tmp_path / "other", "be")
    folder = "{name: image_folder, options: {root: %s, mean: [0.5], std: [0.5]}}"
    common = [*RUNTIME, "data.batch_size=8", "data.num_workers=0", f"data.train={folder % (tmp_path / 'train')}",
              f"runtime.output_dir={tmp_path / 'runs'}", "init.format=none"]
    knn = ["knn.features=pixels", "knn.k=3", "data.train.options.mean=[0.5]"]
    results = run_task(prepare(KNN, [*common, *knn, f"data.eval={folder % (tmp_path / 'eval')}"]))
    assert results["final"]["top1"] == 100.0
    assert results["final"]["per_class_accuracy"] == {"a": None, "b": 100.0, "c": None, "d": 100.0}
    with pytest.raises(MaeframeError, match=r"data.eval: classes \['e'\] are not among the training set's 4"):
        run_task(prepare(KNN, [*common, *knn, "name=other", f"data.eval={folder % (tmp_path / 'other')}"]))
    tuned = run_task(prepare(FINETUNE, [*common, *ENCODER, "optim.epochs=1", "optim.warmup_epochs=0",
                                        "tokenizer.options.image_size=28", f"data.eval={folder % (tmp_path / 'eval')}"]))
    assert tuned["dataset"] == {"train": 24, "eval": 12, "num_classes": 4}
    assert set(tuned["final"]["per_class_accuracy"]) == {"a", "b", "c", "d"}
    assert tuned["final"]["per_class_accuracy"]["a"] is None and tuned["final"]["per_class_accuracy"]["c"] is None
