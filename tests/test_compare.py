"""`maeframe compare` and the evaluation metrics it reports (engine/compare.py, engine/evaluate.py)."""
import json
import math

import pytest
import torch
import yaml
from torch import nn

from maeframe import Prediction
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.compare import compare
from maeframe.engine.compare_report import tail_mean
from maeframe.engine.evaluate import (PSNR_CAP_DB, evaluate, fixed_mask, hf_error_sum, hidden_pixels, laplacian,
                                      psnr_per_image)
from maeframe.errors import RecipeError
from conftest import QUICKSTART, tiny


def variant(tmp_path, name, **changes):
    """A copy of the quickstart recipe named `name`, with dotted fields changed."""
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["name"] = name
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def finite_numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from finite_numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from finite_numbers(value)
    elif isinstance(tree, float):
        yield math.isfinite(tree)


def test_tiny_compare_writes_report_json_and_pictures(tmp_path, capsys):
    a = variant(tmp_path, "a")  # random 0.75
    b = variant(tmp_path, "b", **{"masker.options.ratio": 0.5})
    sets = [arg for override in tiny(tmp_path / "runs") for arg in ("--set", override)]
    assert main(["compare", a, b, "--name", "ab", *sets, "--eval-limit", "32", "--knn-train-limit", "48"]) == 0
    root = tmp_path / "runs" / "ab"
    for name in ["report.md", "report.json", "loss_curves.png", "metrics.png", "eval-recon-a.png", "eval-recon-b.png",
                 "a/metrics.jsonl", "b/last.pt", "a/compare-wall.json", "a/reconstructions/epoch0002.png"]:
        assert (root / name).is_file(), name
    report = json.loads((root / "report.json").read_text())
    assert report["seed"] == 0 and report["machine"]["cpu"] and report["machine"]["torch_threads"] >= 1
    assert all(finite_numbers(report))
    rows = {row["variant"]: row for row in report["variants"]}
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["steps"] == 8 and row["train_seconds"] > 0
        assert row["eval.eval_images"] == 32 and row["eval.knn_train_images"] == 48
        assert 0 < row["eval.masked_psnr"] < PSNR_CAP_DB and row["eval.hf_error"] > 0
        assert 0 <= row["eval.knn_top1"] <= 1 and row["final_train_loss"] > 0
        assert set(row["final_train_terms"]) == {"mse"}
        assert row["target"] == {"name": "pixel", "options": {"norm_pix": True, "eps": 1e-6, "norm_over": "patch",
                                                                   "eps_after_sqrt": False}}
    assert report["differences"] == {"masker.options.ratio": [0.75, 0.5]}
    # same eval mask and data for both: only the trained weights differ, so the numbers differ
    assert rows["a"]["eval.masked_psnr"] != rows["b"]["eval.masked_psnr"]
    text = (root / "report.md").read_text()
    for v in "ab":  # the last training picture is linked: copied, or named as identical to the eval picture
        assert f"last training picture ({v}/reconstructions/epoch0002.png)" in text
        assert (root / f"recon-{v}.png").is_file() or f"identical to eval-recon-{v}.png" in text
    assert "| `a` |" in text and "| `b` |" in text and "masked PSNR" in text
    assert 'target `pixel` {"norm_pix": true, "eps": 1e-06, "norm_over": "patch", "eps_after_sqrt": false}' in text
    assert "seed: 0" in text and "maeframe compare" in text and "maeframe run" in text and "(loss_curves.png)" in text


def test_compare_refuses_a_different_budget_or_seed(tmp_path):
    a = variant(tmp_path, "a")
    base = yaml.safe_load(QUICKSTART.read_text())
    overrides = [o for o in tiny(tmp_path / "runs") if not o.startswith("optim.epochs")]  # would equalise them
    with pytest.raises(RecipeError) as err:
        compare([a, variant(tmp_path, "b", **{"optim.epochs": base["optim"]["epochs"] + 1})], "x", overrides)
    assert [path for path, _ in err.value.problems] == ["optim.epochs"]
    with pytest.raises(RecipeError) as err:
        compare([a, variant(tmp_path, "c", seed=base.get("seed", 0) + 1)], "x", overrides)
    assert [path for path, _ in err.value.problems] == ["seed"]
    with pytest.raises(RecipeError) as err:  # the innermost differing field is named
        compare([a, variant(tmp_path, "e", **{"data.train.options.limit": 10})], "x",
                [o for o in overrides if not o.startswith("data.train.options.limit")])
    assert [path for path, _ in err.value.problems] == ["data.train.options.limit"]
    with pytest.raises(RecipeError, match="data.batch_size"):
        compare([a, variant(tmp_path, "d", **{"data.batch_size": base["data"]["batch_size"] // 2})], "x")
    with pytest.raises(RecipeError, match="distinct recipe name"):
        compare([a, a], "x", overrides)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_psnr_of_known_noise_and_of_a_perfect_reconstruction():
    torch.manual_seed(0)
    original = torch.rand(3, 1, 8, 8)
    hidden = torch.zeros_like(original)
    hidden[:, :, :4] = 1.0
    sign = torch.randint(0, 2, original.shape).float() * 2 - 1
    noisy = original + 0.1 * sign * hidden + 0.5 * (1 - hidden)  # the visible half is far off, and ignored
    expected = 10 * math.log10(1 / 0.1**2)  # MSE over hidden pixels = 0.01 exactly -> 20 dB
    assert torch.allclose(psnr_per_image(noisy, original, hidden), torch.full((3,), expected), atol=1e-4)
    assert psnr_per_image(original, original, hidden).tolist() == [PSNR_CAP_DB] * 3  # MSE 0: capped


def test_high_frequency_error_of_constant_images_and_of_an_impulse():
    weight = torch.ones(2, 3, 6, 7)
    assert laplacian(torch.full((2, 3, 6, 7), 0.3)).abs().max() == 0  # replicate padding: borders too
    total, pixels = hf_error_sum(torch.full((2, 3, 6, 7), 0.9), torch.full((2, 3, 6, 7), 0.2), weight)
    assert total == 0 and pixels == weight.numel()  # constant, even if at the wrong level
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0
    total, pixels = hf_error_sum(impulse, torch.zeros_like(impulse), torch.ones_like(impulse))
    assert total / pixels == pytest.approx((4 + 4 * 1) / 25)


class Oracle(nn.Module):
    """Predicts every patch exactly (a raw-pixel target), with a noise of `noise` on top."""

    def __init__(self, noise=0.0):
        super().__init__()
        self.noise = noise

    def forward(self, patches, mask):
        return Prediction(patches + self.noise, torch.zeros(patches.shape[0], 1 + mask.num_visible, 4))


def test_evaluation_of_a_perfect_and_of_an_imperfect_model(tmp_path):
    prepared = prepare(QUICKSTART, tiny(tmp_path, "target.options.norm_pix=false", "data.train.options.limit=40"))
    perfect = evaluate(Oracle(), prepared, knn=False, limit=24, batch_size=10)
    assert perfect["masked_psnr"] == PSNR_CAP_DB and perfect["hf_error"] == 0
    assert perfect["eval_loss/mse"] == 0 and perfect["eval_images"] == 24 and perfect["knn_top1"] is None
    worse = evaluate(Oracle(noise=0.3), prepared, knn=False, limit=24, batch_size=7)
    assert worse["masked_psnr"] < 30 and worse["eval_loss/mse"] == pytest.approx(0.09, rel=1e-4)
    assert worse["hf_error"] > 0  # constant offset inside hidden patches, but seams at their borders


def test_fixed_mask_depends_only_on_seed_and_ratio():
    spec = prepare(QUICKSTART).components.tokenizer.spec
    mask = fixed_mask(10, spec, 0.75, seed=3)
    assert mask.masked.sum(1).tolist() == [37.0] * 10  # 49 tokens, int(49 · 0.25) = 12 visible
    assert torch.equal(fixed_mask(10, spec, 0.75, seed=3).ids_keep, mask.ids_keep)
    assert not torch.equal(fixed_mask(10, spec, 0.75, seed=4).ids_keep, mask.ids_keep)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(fixed_mask(10, spec, 0.75, seed=3).ids_restore, mask.ids_restore)
    tokenizer = prepare(QUICKSTART).components.tokenizer
    assert hidden_pixels(tokenizer, mask).sum() == 10 * 37 * 16


def test_final_loss_is_the_mean_over_the_last_five_percent_of_steps():
    lines = [{"step": s, "loss": float(s)} for s in range(1, 41)]  # one line per step
    assert tail_mean(lines, "loss") == pytest.approx((39 + 40) / 2)  # 5% of 40 steps = the last 2
    windows = [{"step": 10 * i, "loss": float(i)} for i in range(1, 11)]  # each line averages 10 steps
    assert tail_mean(windows, "loss") == 10.0  # the last 5 steps all lie in the last window
    assert tail_mean([{"step": 10, "loss": 1.0}, {"step": 20, "x": 2.0}], "missing") is None


def test_resume_reuses_finished_variants(tmp_path):
    a, b = variant(tmp_path, "a"), variant(tmp_path, "b", **{"masker.options.ratio": 0.5})
    overrides = tiny(tmp_path / "runs", "optim.epochs=1")
    first = compare([a, b], "ab", overrides, eval_limit=16, knn_train_limit=16, log=lambda *_: None)
    again = compare([a, b], "ab", overrides, eval_limit=16, knn_train_limit=16, resume=True, log=lambda *_: None)
    for before, after in zip(first["variants"], again["variants"]):
        assert after["resumed"] and after["steps"] == before["steps"] == 4
        assert after["train_seconds"] == before["train_seconds"]  # training not re-timed (nor rounded twice)
        assert after["eval.masked_psnr"] == before["eval.masked_psnr"]  # same weights, same fixed mask
