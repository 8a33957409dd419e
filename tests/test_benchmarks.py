"""The benchmark scripts: the official-MAE reference computes what HF's ViTMAE (an independent
implementation of the official model) computes, and pretrain_step.py times maeframe beside both references
and writes a complete report."""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICKSTART
from test_interop import CHANNELS, IMAGE, PATCH, RATIO, inputs, official_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretrain_step  # noqa: E402
from official_mae import OfficialMae, official_grad_norm  # noqa: E402


@pytest.mark.parametrize("norm_pix", [True, False])
def test_official_reference_matches_hf_vitmae(norm_pix):
    hf, official = official_weights(norm_pix)
    model = OfficialMae(IMAGE, PATCH, CHANNELS, dim=64, depth=2, heads=4, dec_dim=32, dec_depth=1, dec_heads=4,
                        mlp_ratio=4.0, mask_ratio=RATIO, norm_pix=norm_pix).eval()
    model.load_state_dict(official)  # strict: the official checkpoint's names and shapes
    images, _ = inputs()
    torch.manual_seed(3)
    noise = torch.rand(images.shape[0], (IMAGE // PATCH) ** 2)
    torch.manual_seed(3)  # the reference draws the same noise inside its forward
    with torch.no_grad():
        loss, pred, mask = model(images)
        ref = hf(pixel_values=images, noise=noise)
    assert torch.equal(mask, ref.mask)
    torch.testing.assert_close(pred, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)


def test_official_grad_norm_is_the_global_norm():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    sum(p.square().sum() for p in params).backward()
    expected = torch.cat([p.grad.flatten() for p in params]).norm()
    torch.testing.assert_close(official_grad_norm(params), expected)


def test_pretrain_step_times_maeframe_beside_both_references(tmp_path):
    report = pretrain_step.main([str(QUICKSTART), "--batch-size", "4", "--steps", "1", "--warmup", "1",
                                 "--repeats", "2", "--references", "hf,official", "--contention-retries", "0",
                                 "--rss-interval-ms", "0", "--profile", str(tmp_path / "profile.txt"),
                                 "--out", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["implementations"] == report["implementations"]
    impls = report["implementations"]
    assert set(impls) == {"maeframe", "hf-transformers", "official-mae"}
    assert len({r["trainable_params"] for r in impls.values()}) == 1  # the three configs match
    gflops = [r["gflop_per_img"] for r in impls.values()]
    assert max(gflops) / min(gflops) < 1.05  # same work, up to the references' embedding of hidden patches
    assert set(report["ratios_img_s"]) == {"maeframe/hf-transformers", "maeframe/official-mae"}
    assert all(len(r["img_s_per_round"]) == 2 and r["img_s"] > 0 for r in impls.values())
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_pretrain_step_rejects_an_unknown_reference(capsys):
    with pytest.raises(SystemExit):
        pretrain_step.main([str(QUICKSTART), "--references", "hf,fb"])
    assert "unknown ['fb']" in capsys.readouterr().err
