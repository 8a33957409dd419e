"""Hugging Face transformers both ways: `maeframe export --format hf` loads into ViTMAEForPreTraining / ViTModel
with no missing or unexpected key and computes what maeframe computes (same noise: same mask, latent,
predictions and loss); `init.format: hf` reads those directories and transformers-written ones."""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from transformers import ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

from maeframe import Mask, Options, visible_count
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import FORMAT, atomic_save, load_checkpoint
from maeframe.engine.finetune import FineTuner
from maeframe.interop import InteropError
from maeframe.interop.hf_export import export_hf
from maeframe.model import MaskedAutoencoder
from maeframe.model.vit import Encoder
from maeframe.recipe import ComponentRef, DataConfig, EncoderConfig, LossRef, ModelConfig, OptimConfig, Recipe
from maeframe_plugins.hf_weights import HFWeights
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.losses import MaskedMSE
from maeframe_plugins.targets import PixelOptions, PixelTarget
from conftest import RECIPES

IMAGE, PATCH, CHANNELS, RATIO = 32, 8, 3, 0.75
CONFIG = ModelConfig(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
FINETUNE = RECIPES / "finetune_fmnist.yaml"


def tokenizer() -> ImagePatchTokenizer:
    return ImagePatchTokenizer(ImagePatchOptions(image_size=IMAGE, patch_size=PATCH, channels=CHANNELS))


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its init, so no LayerNorm, bias or token stays trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def write_checkpoint(path, model: MaskedAutoencoder, target: str = "pixel", target_options=None,
                     tokenizer_ref=None) -> None:
    """A pretraining checkpoint with the keys export reads: format, task, model, recipe."""
    tokenizer_ref = tokenizer_ref or ComponentRef(name="image_patch", options=tokenizer().options.model_dump())
    recipe = Recipe(name="hf", tokenizer=tokenizer_ref, masker=ComponentRef(name="random", options={"ratio": RATIO}),
                    target=ComponentRef(name=target, options=target_options or {}), losses=[LossRef(name="mse")],
                    model=model.config, data=DataConfig(train=ComponentRef(name="fashion_mnist"), batch_size=1),
                    optim=OptimConfig(epochs=1))
    atomic_save({"format": FORMAT, "task": "pretrain", "step": 0, "model": model.state_dict(),
                 "recipe": recipe.model_dump(mode="json")}, path)


def mae(config: ModelConfig = CONFIG) -> MaskedAutoencoder:
    spec = tokenizer().spec
    model = perturbed(MaskedAutoencoder(spec, spec.patch_dim, config))
    model.config = config
    return model


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=gen),
            torch.rand(batch, (IMAGE // PATCH) ** 2, generator=gen))


def loaded(cls, path, **kwargs):
    """cls.from_pretrained(path) in eval mode; transformers reports no missing, unexpected or resized tensor."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    assert {k: list(v) for k, v in info.items() if k != "error_msgs" and v} == {}, info
    return model.eval()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_export_matches_vitmae_for_pretraining(tmp_path, norm_pix):
    model, tok = mae(), tokenizer()
    write_checkpoint(tmp_path / "last.pt", model, target_options={"norm_pix": norm_pix})
    export = export_hf(tmp_path / "last.pt", tmp_path / "hf")
    assert export.architecture == "ViTMAEForPreTraining"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["norm_pix_loss"] is norm_pix and config["mask_ratio"] == RATIO
    hf = loaded(ViTMAEForPreTraining, tmp_path / "hf")
    target, loss_fn = PixelTarget(PixelOptions(norm_pix=norm_pix), tok), MaskedMSE(Options(), tok)
    images, noise = inputs()
    with torch.no_grad():
        ref = hf(pixel_values=images, noise=noise)
        ref_latent = hf.vit(pixel_values=images, noise=noise).last_hidden_state
        tokens = tok.tokenize(images)
        mask = Mask.from_noise(noise, visible_count(tokens.patches.shape[1], RATIO))
        pred = model(tokens.patches, mask)
        loss = loss_fn(pred, target(tokens, mask), mask)
    assert torch.equal(ref.mask, mask.masked) and torch.equal(ref.ids_restore, mask.ids_restore)
    assert ref.logits.abs().max() > 0.1  # non-trivial predictions, so equality means something
    torch.testing.assert_close(pred.latent, ref_latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.values, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)


def test_encoder_exports_match_vit_and_vitmae_model(tmp_path, capsys):
    model, tok = mae(), tokenizer()
    write_checkpoint(tmp_path / "last.pt", model)
    assert main(["export", "--format", "hf", str(tmp_path / "last.pt"), str(tmp_path / "full")]) == 0
    assert main(["export", "--format", "hf", "--encoder-only", str(tmp_path / "last.pt"), str(tmp_path / "enc")]) == 0
    assert "ViTModel.from_pretrained" in capsys.readouterr().out
    images, _ = inputs()
    order = torch.arange(tok.spec.num_tokens, dtype=torch.float32).expand(len(images), -1)  # keep the token order
    with torch.no_grad():
        ours = model.encoder(tok.tokenize(images).patches)
        vit = loaded(ViTModel, tmp_path / "enc", add_pooling_layer=False)(pixel_values=images).last_hidden_state
        vitmae = ViTMAEModel.from_pretrained(str(tmp_path / "full"), mask_ratio=0.0).eval()
        unmasked = vitmae(pixel_values=images, noise=order).last_hidden_state
    torch.testing.assert_close(vit, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmasked, ours, atol=1e-5, rtol=0)


def test_export_refuses_what_transformers_cannot_compute(tmp_path, capsys):
    model = mae()
    write_checkpoint(tmp_path / "hog.pt", model, target="hog")
    with pytest.raises(InteropError, match="predicts target 'hog'.*--encoder-only"):
        export_hf(tmp_path / "hog.pt", tmp_path / "x")
    assert export_hf(tmp_path / "hog.pt", tmp_path / "x", encoder_only=True).architecture == "ViTModel"
    write_checkpoint(tmp_path / "eps.pt", model, target_options={"eps": 1e-4})
    with pytest.raises(InteropError, match="norm_pix eps is 0.0001"):
        export_hf(tmp_path / "eps.pt", tmp_path / "y")
    video = ComponentRef(name="video_tube", options={"num_frames": 4, "image_size": 32, "patch_size": 8, "tubelet": 2})
    config = ModelConfig(embed_dim=36, depth=1, num_heads=2, decoder_embed_dim=12, decoder_depth=1,
                         decoder_num_heads=2)  # sin-cos over 3 axes: widths divisible by 6
    spec = prepare(Recipe(name="v", tokenizer=video, masker=ComponentRef(name="random"), target=ComponentRef(
        name="pixel"), losses=[LossRef(name="mse")], model=config, data=DataConfig(train=ComponentRef(
            name="fashion_mnist"), batch_size=1), optim=OptimConfig(epochs=1))).components.tokenizer.spec
    video_model = MaskedAutoencoder(spec, spec.patch_dim, config)
    video_model.config = config
    write_checkpoint(tmp_path / "video.pt", video_model, tokenizer_ref=video)
    assert main(["export", "--format", "hf", str(tmp_path / "video.pt"), str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "VideoMAEForPreTraining" in err and "model.cls_token: false" in err
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z*"))


def test_round_trip_export_then_init_hf_is_bitwise(tmp_path):
    model = mae()
    write_checkpoint(tmp_path / "last.pt", model)
    export_hf(tmp_path / "last.pt", tmp_path / "hf")
    weights = HFWeights(Options()).read(tmp_path / "hf", tokenizer().spec, CONFIG, {})
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.") and k != "encoder.pos_embed"}
    assert set(weights) == set(ours)
    assert all(torch.equal(weights[k], v) for k, v in ours.items())


def hf_sincos(grid: int, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos [1, 1 + grid², dim] with a zero cls row, from maeframe's own table."""
    from maeframe.model.pos_embed import sincos_pos_embed

    return torch.cat([torch.zeros(1, dim), sincos_pos_embed((grid, grid), dim)])[None]


def transformers_directory(path, cls, config) -> torch.nn.Module:
    """A random model written by transformers' own save_pretrained (positions set to the fixed sin-cos)."""
    torch.manual_seed(0)
    model = perturbed(cls(config))
    grid, embeddings = config.image_size // config.patch_size, (model.vit if cls is ViTMAEForPreTraining else model)
    with torch.no_grad():
        embeddings.embeddings.position_embeddings.copy_(hf_sincos(grid, config.hidden_size))
    model.save_pretrained(str(path))
    return model


def test_finetune_from_a_transformers_written_vitmae(tmp_path):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
                 patch_size=4, num_channels=1, layer_norm_eps=1e-6)  # the finetune_fmnist tokenizer's grid
    hf = transformers_directory(tmp_path / "vitmae", ViTMAEForPreTraining, ViTMAEConfig(
        **sizes, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64))
    vit = transformers_directory(tmp_path / "vit", ViTModel, ViTConfig(**sizes))
    trainer = FineTuner(prepare(FINETUNE, [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.train.options.limit=32",
        "data.eval.options.limit=16", "data.batch_size=16", "data.num_workers=0", "runtime.progress_bar=false",
        "runtime.tensorboard=false", "runtime.max_steps=2", f"runtime.output_dir={tmp_path / 'runs'}",
        "init.format=hf", f"init.checkpoint={tmp_path / 'vitmae'}"]))
    spec, encoder_config = trainer.tokenizer.spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    order = torch.arange(spec.num_tokens, dtype=torch.float32).expand(2, -1)
    for directory, reference in (("vitmae", lambda x: hf.vit(pixel_values=x, noise=order)), ("vit", vit)):
        weights = HFWeights(Options()).read(tmp_path / directory, spec, encoder_config, {})
        encoder = Encoder(spec.grid, spec.patch_dim, 32, 2, 2).eval()
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items()})
        with torch.no_grad():
            ours = encoder(trainer.tokenizer.tokenize(images).patches)
            hf.config.mask_ratio = 0.0
            torch.testing.assert_close(ours, reference(images).last_hidden_state, atol=1e-5, rtol=0)
        if directory == "vitmae":
            tuned = trainer.model.state_dict()
            assert all(torch.equal(tuned[k], v) for k, v in weights.items() if k in tuned)
    trainer.train()
    tuned = tmp_path / "runs" / "finetune_fmnist" / "last.pt"
    assert load_checkpoint(tuned)["step"] == 2
    with pytest.raises(InteropError, match="a finetune checkpoint without a decoder; pass --encoder-only"):
        export_hf(tuned, tmp_path / "tuned")
    with pytest.raises(InteropError, match="no final norm"):  # avg pooling: ViTModel cannot drop its layernorm
        export_hf(tuned, tmp_path / "tuned", encoder_only=True)


def test_hf_directory_errors_name_file_tensor_and_reason(tmp_path):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                 patch_size=8, num_channels=3)  # transformers' default layer_norm_eps 1e-12: read, with a warning
    transformers_directory(tmp_path / "vit", ViTModel, ViTConfig(**sizes))
    spec, fmt = tokenizer().spec, HFWeights(Options())
    with pytest.warns(UserWarning, match=r"layer_norm_eps is 1e-12, maeframe's LayerNorms use 1e-06"):
        assert fmt.read(tmp_path / "vit", spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2), {})
    wide = EncoderConfig(embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(InteropError, match=r"vit/config.json: does not describe.*hidden_size is 32, the recipe's "
                                           r"model.embed_dim gives 64"):
        fmt.read(tmp_path / "vit", spec, wide, {})
    learned = ViTModel(ViTConfig(**sizes))  # transformers' random learned positions
    learned.save_pretrained(str(tmp_path / "learned"))
    with pytest.raises(InteropError, match=r"learned.*position_embeddings\) differs from the fixed sin-cos"):
        fmt.read(tmp_path / "learned", spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2), {})
    shutil.copytree(tmp_path / "vit", tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InteropError, match=r"bad/config.json: model_type 'bert'"):
        fmt.read(tmp_path / "bad", spec, wide, {})
    tensors = safetensors.torch.load_file(tmp_path / "vit" / "model.safetensors")
    del tensors["encoder.layer.1.attention.attention.key.weight"]
    tensors["encoder.layer.0.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(InteropError, match=r"vit: tensors that are not part of a ViT / ViTMAE model: "
                                           r"encoder.layer.0.extra.weight"):
        fmt.read(tmp_path / "vit", spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2), {})
    del tensors["encoder.layer.0.extra.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(InteropError, match=r"blocks.1.attn.qkv has only \['attention.attention.query', "
                                           r"'attention.attention.value'\] of query, key and value"):
        fmt.read(tmp_path / "vit", spec, EncoderConfig(embed_dim=32, depth=2, num_heads=2), {})


def test_hf_videomae_directory_matches_videomae_model(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    from maeframe.model.classifier import Classifier
    from maeframe.interop.encoder_weights import load_encoder
    from maeframe_plugins.hf_weights import HFVideoMAEWeights
    from maeframe_plugins.video import VideoTubeOptions, VideoTubeTokenizer

    config = VideoMAEConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=2, intermediate_size=144,
                            image_size=16, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2,
                            layer_norm_eps=1e-6, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                            decoder_num_attention_heads=2, decoder_intermediate_size=64)
    torch.manual_seed(0)
    hf = perturbed(VideoMAEForPreTraining(config))  # use_mean_pooling: no final norm, as maeframe's avg pool
    hf.save_pretrained(str(tmp_path / "videomae"))
    tok = VideoTubeTokenizer(VideoTubeOptions(num_frames=4, image_size=16, patch_size=8, tubelet=2, channels=3))
    fmt, encoder = HFVideoMAEWeights(Options()), EncoderConfig(embed_dim=36, depth=2, num_heads=2)  # 3-D: 6 | width
    classifier = Classifier(tok.spec, encoder, num_classes=3, layout=fmt.layout).eval()
    assert load_encoder(classifier, fmt.read(tmp_path / "videomae", tok.spec, encoder, {}), "videomae") == []
    clips = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(3))  # [B, C, T, H, W]
    with torch.no_grad():
        theirs = hf.videomae(pixel_values=clips.transpose(1, 2)).last_hidden_state  # transformers: [B, T, C, H, W]
        patches, ours = tok.tokenize(clips).patches, classifier.encoder
        tokens = ours.blocks(ours.patch_embed(patches) + ours.pos_embed)
    torch.testing.assert_close(tokens, theirs, atol=1e-5, rtol=0)
    with pytest.raises(InteropError, match=r"videomae/config.json: a VideoMAE model.*init.format: hf_videomae"):
        HFWeights(Options()).read(tmp_path / "videomae", tok.spec, encoder, {})


def test_spectrogram_encoder_exports_as_a_non_square_vit(tmp_path):
    """A (time, frequency) grid: transformers has no AudioMAE, but its ViTModel computes this encoder
    exactly on a [B, 1, T, F] input; the decoder (ViTMAE's loss patchifies square images) is refused."""
    from maeframe_plugins.audio import SpectrogramOptions, SpectrogramTokenizer

    tok = SpectrogramTokenizer(SpectrogramOptions(target_length=48, num_mel_bins=16, patch_size=8))
    spec = tok.spec
    model = perturbed(MaskedAutoencoder(spec, spec.patch_dim, CONFIG))
    model.config = CONFIG
    write_checkpoint(tmp_path / "audio.pt", model, tokenizer_ref=ComponentRef(
        name="spectrogram", options={"target_length": 48, "num_mel_bins": 16, "patch_size": 8}))
    with pytest.raises(InteropError, match=r"square images.*\(6, 2\).*--encoder-only"):
        export_hf(tmp_path / "audio.pt", tmp_path / "x")
    export_hf(tmp_path / "audio.pt", tmp_path / "enc", encoder_only=True)
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["image_size"] == [48, 16]
    fbank = torch.randn(2, 1, 48, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = loaded(ViTModel, tmp_path / "enc", add_pooling_layer=False)(pixel_values=fbank).last_hidden_state
        ours = model.encoder(tok.tokenize(fbank).patches)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    weights = HFWeights(Options()).read(tmp_path / "enc", spec, CONFIG, {})  # and back, bit for bit
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert len(weights) == len([k for k in model.state_dict() if k.startswith("encoder.")])


def test_tensor_shapes_that_contradict_config_json_are_named(tmp_path):
    model = mae()
    write_checkpoint(tmp_path / "last.pt", model)
    export_hf(tmp_path / "last.pt", tmp_path / "hf", encoder_only=True)
    tensors = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    tensors["embeddings.cls_token"] = torch.zeros(1, 1, 48)
    tensors["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(64, 32)
    safetensors.torch.save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(InteropError, match=r"hf: tensors whose shapes contradict config.json: "
                                           r"embeddings.cls_token \[1, 1, 48\] \(config.json implies \[1, 1, 32\]\); "
                                           r"encoder.layer.1.intermediate.dense.weight \[64, 32\] \(config.json "
                                           r"implies \[128, 32\]\)"):
        HFWeights(Options()).read(tmp_path / "hf", tokenizer().spec, EncoderConfig(embed_dim=32, depth=2,
                                                                                    num_heads=2), {})


def test_sharded_transformers_directory_reads_like_one_file(tmp_path):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                 patch_size=8, num_channels=3, layer_norm_eps=1e-6)
    model = transformers_directory(tmp_path / "one", ViTModel, ViTConfig(**sizes))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    fmt, encoder = HFWeights(Options()), EncoderConfig(embed_dim=32, depth=2, num_heads=2)
    one, sharded = (fmt.read(tmp_path / name, tokenizer().spec, encoder, {}) for name in ("one", "sharded"))
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
