"""Reference MAE weights <-> maeframe, checked against HF transformers' ViTMAE as an independent
implementation, and the timm encoder export."""
from __future__ import annotations

import argparse

import pytest
import safetensors.torch
import timm
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from maeframe import Mask, Options, visible_count
from maeframe.cli import main
from maeframe.engine.checkpoint import FORMAT, atomic_save
from maeframe.interop import (export_encoder, infer_config, load_official_mae, maeframe_to_official,
                              official_to_maeframe)
from maeframe.model import MaskedAutoencoder
from maeframe.recipe import ComponentRef, DataConfig, LossRef, ModelConfig, OptimConfig, Recipe
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.losses import MaskedMSE
from maeframe_plugins.targets import PixelOptions, PixelTarget

IMAGE, PATCH, CHANNELS, RATIO = 32, 8, 3, 0.75
CONFIG = ModelConfig(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
TIMM_SMALL = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=64, depth=2, num_heads=4)


def tokenizer(image: int = IMAGE, patch: int = PATCH) -> ImagePatchTokenizer:
    return ImagePatchTokenizer(ImagePatchOptions(image_size=image, patch_size=patch, channels=CHANNELS))


def hf_sincos(grid: int, dim: int) -> torch.Tensor:
    """HF's fixed pos-embed [1, 1 + grid², dim] in the layout of the released MAE weights."""
    try:
        from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
    except ImportError:  # transformers < 5
        from transformers.models.vit_mae.modeling_vit_mae import get_2d_sincos_pos_embed
        return torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)).float()[None]
    pos = build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
    return torch.cat([pos[:, dim // 2:], pos[:, :dim // 2]], dim=1)[None]  # HF's own h/w swap, see its init


def hf_model(norm_pix: bool) -> ViTMAEForPreTraining:
    config = ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=128, image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, norm_pix_loss=norm_pix, mask_ratio=RATIO)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # perturb every weight so no LayerNorm/bias/token stays trivial
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
        # The HF init (transformers 5.x) leaves both fixed pos-embeds at zero; set the sin-cos explicitly.
        model.vit.embeddings.position_embeddings.copy_(hf_sincos(IMAGE // PATCH, 64))
        model.decoder.decoder_pos_embed.copy_(hf_sincos(IMAGE // PATCH, 32))
    return model


# HF layer names (new and pre-5.0 transformers) -> reference names inside one block
LAYER = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
         "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "attention.output.dense": "attn.proj",
         "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
QKV = [("attention.q_proj", "attention.k_proj", "attention.v_proj"),
       ("attention.attention.query", "attention.attention.key", "attention.attention.value")]
SINGLE = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
          "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed"}
MODULES = {"vit.embeddings.patch_embeddings.projection": "patch_embed.proj", "vit.layernorm": "norm",
           "decoder.decoder_embed": "decoder_embed", "decoder.decoder_norm": "decoder_norm",
           "decoder.decoder_pred": "decoder_pred"}


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining state dict -> facebookresearch/mae MaskedAutoencoderViT layout."""
    out = {ours: sd[hf] for hf, ours in SINGLE.items()}
    out |= {f"{ours}.{t}": sd[f"{hf}.{t}"] for hf, ours in MODULES.items() for t in ("weight", "bias")}
    for hf_prefix, ours in (("vit.layers.", "blocks."), ("vit.encoder.layer.", "blocks."),
                            ("decoder.decoder_layers.", "decoder_blocks.")):
        for i in sorted({k[len(hf_prefix):].split(".")[0] for k in sd if k.startswith(hf_prefix)}):
            src, dst = f"{hf_prefix}{i}.", f"{ours}{i}."
            for t in ("weight", "bias"):
                for names in QKV:
                    if f"{src}{names[0]}.{t}" in sd:
                        out[f"{dst}attn.qkv.{t}"] = torch.cat([sd[f"{src}{n}.{t}"] for n in names])
                out |= {f"{dst}{b}.{t}": sd[f"{src}{a}.{t}"] for a, b in LAYER.items() if f"{src}{a}.{t}" in sd}
    return out


def official_weights(norm_pix: bool = True) -> tuple[ViTMAEForPreTraining, dict[str, torch.Tensor]]:
    hf = hf_model(norm_pix)
    return hf, {k: v.clone() for k, v in hf_to_official(hf.state_dict()).items()}


def mae(config: ModelConfig = CONFIG, tok: ImagePatchTokenizer | None = None) -> MaskedAutoencoder:
    spec = (tok or tokenizer()).spec
    return MaskedAutoencoder(spec, spec.patch_dim, config).eval()


def inputs(batch: int = 2, image: int = IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, CHANNELS, image, image, generator=gen)
    return images, torch.rand(batch, (image // PATCH) ** 2, generator=gen)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_hf_vitmae(norm_pix, tmp_path):
    hf, official = official_weights(norm_pix)
    path = tmp_path / "mae.pth"
    torch.save({"model": official}, path)
    model, tok = mae(), tokenizer()
    assert load_official_mae(path, model) == []
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
    torch.testing.assert_close(pred.latent, ref_latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.values, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)


def test_encoder_only_checkpoint(tmp_path):
    _, official = official_weights()
    encoder_only = {k: v for k, v in official.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save(encoder_only, tmp_path / "enc.pth")
    torch.save({"model": official}, tmp_path / "full.pth")
    full, partial = mae(), mae()
    decoder_init = {k: v.clone() for k, v in partial.decoder.state_dict().items()}
    load_official_mae(tmp_path / "full.pth", full)
    missing = load_official_mae(tmp_path / "enc.pth", partial)
    assert sorted(missing) == sorted(f"decoder.{k}" for k in decoder_init)
    assert all(torch.equal(v, partial.decoder.state_dict()[k]) for k, v in decoder_init.items())
    patches = tokenizer().tokenize(inputs()[0]).patches
    with torch.no_grad():
        assert torch.equal(full.encoder(patches), partial.encoder(patches))
    assert official_to_maeframe(encoder_only)[1] == ["decoder."]


def test_round_trip_is_identity():
    _, official = official_weights()
    converted, missing = official_to_maeframe({"model": official})
    assert missing == [] and set(converted) == set(mae().state_dict())
    back = maeframe_to_official(converted, tokenizer().spec)
    assert set(back) == set(official)
    for key, value in official.items():
        torch.testing.assert_close(back[key], value, atol=1e-7, rtol=0, msg=key)


def test_load_errors_name_the_problem(tmp_path):
    _, official = official_weights()
    path = tmp_path / "mae.pth"
    torch.save({"model": official}, path)
    wider = CONFIG.model_copy(update={"embed_dim": 96})
    with pytest.raises(ValueError, match=r"cls_token: checkpoint \[1, 1, 64\] vs model \[1, 1, 96\]"):
        load_official_mae(path, mae(wider))
    with pytest.raises(ValueError, match="pos_embed has 16 positions"):
        load_official_mae(path, mae(tok=tokenizer(image=40)))
    shifted = dict(official, decoder_pos_embed=official["decoder_pos_embed"] + 0.1)
    with pytest.raises(ValueError, match="decoder_pos_embed differs from the fixed sin-cos"):
        official_to_maeframe(shifted)
    pickled = tmp_path / "train_ckpt.pth"
    torch.save({"model": official, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match=r"train_ckpt\.pth.*weights_only=True.*'model'"):
        load_official_mae(pickled, mae())


def test_infer_config():
    _, official = official_weights()
    config, patch, chans, grid = infer_config({"model": official})
    assert (patch, chans, grid) == (PATCH, CHANNELS, (4, 4))
    expected = CONFIG.model_dump(exclude={"num_heads", "decoder_num_heads", "drop_path"})
    assert ModelConfig(**config).model_dump(exclude={"num_heads", "decoder_num_heads", "drop_path"}) == expected


def check_timm(out, name: str, model: MaskedAutoencoder, tok: ImagePatchTokenizer, pretrained: bool = True,
               **kwargs) -> None:
    """The exported file loads into timm (strict, and through pretrained_cfg_overlay unless pretrained is
    False), and timm's forward_features equal maeframe's encoder over all tokens."""
    images = inputs(batch=1, image=tok.spec.grid[0] * tok.spec.patch_size[0])[0]
    with torch.device("meta"):  # no random init: the strict load assigns every tensor
        strict = timm.create_model(name, num_classes=0, **kwargs)
    strict.load_state_dict(safetensors.torch.load_file(out), strict=True, assign=True)
    vits = [strict.eval()]
    if pretrained:
        vits.append(timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                                      pretrained_cfg_overlay={"file": str(out)}).eval())
    with torch.no_grad():
        ours = model.encoder(tok.tokenize(images).patches, ids_keep=None)
        for vit in vits:
            torch.testing.assert_close(vit.forward_features(images), ours, atol=1e-5, rtol=0)


def test_export_official_pth(tmp_path):
    _, official = official_weights()
    torch.save({"model": official}, tmp_path / "mae.pth")
    model = mae()
    load_official_mae(tmp_path / "mae.pth", model)
    export = export_encoder(tmp_path / "mae.pth", tmp_path / "enc.safetensors", "vit_tiny_patch16_224")
    path, name = export.path, export.name
    assert name == "vit_tiny_patch16_224" and path.is_file()
    # the architecture arguments vit_tiny needs; num_heads is not in reference weights (guessed, flagged)
    assert not export.heads_known and {k: v for k, v in export.kwargs.items() if k != "num_heads"} == \
        {k: v for k, v in TIMM_SMALL.items() if k != "num_heads"}
    check_timm(path, name, model, tokenizer(), **TIMM_SMALL)
    with pytest.raises(ValueError, match="--timm-name"):  # 64 wide: no registered timm model fits
        export_encoder(tmp_path / "mae.pth", tmp_path / "other.safetensors")


def maeframe_checkpoint(path, model: MaskedAutoencoder, tok: ImagePatchTokenizer, config: ModelConfig) -> None:
    """The keys of `Pretrainer.state_dict` that matter here: format, model, recipe."""
    recipe = Recipe(
        name="export", tokenizer=ComponentRef(name="image_patch", options=tok.options.model_dump(mode="json")),
        masker=ComponentRef(name="random"), target=ComponentRef(name="pixel"), losses=[LossRef(name="mse")],
        model=config, data=DataConfig(train=ComponentRef(name="fashion_mnist"), batch_size=1),
        optim=OptimConfig(epochs=1))
    atomic_save({"format": FORMAT, "step": 0, "model": model.state_dict(), "recipe": recipe.model_dump(mode="json")},
                path)


def test_export_maeframe_checkpoint_infers_timm_name(tmp_path):
    tiny = ModelConfig(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=4)
    tok = tokenizer(image=224, patch=16)
    torch.manual_seed(0)
    model = mae(tiny, tok)
    maeframe_checkpoint(tmp_path / "last.pt", model, tok, tiny)
    export = export_encoder(tmp_path / "last.pt", tmp_path / "tiny.safetensors")
    path, name = export.path, export.name
    assert name == "vit_tiny_patch16_224" and export.kwargs == {} and export.heads_known
    check_timm(path, name, model, tok, pretrained=False)  # the overlay path is covered by the small tests


def test_cli_export(tmp_path, capsys):
    model, tok = mae(), tokenizer()
    maeframe_checkpoint(tmp_path / "last.pt", model, tok, CONFIG)
    out = tmp_path / "sub" / "enc.safetensors"
    assert main(["export", str(tmp_path / "last.pt"), str(out), "--timm-name", "vit_tiny_patch16_224"]) == 0
    assert out.is_file() and "vit_tiny_patch16_224" in capsys.readouterr().out
    check_timm(out, "vit_tiny_patch16_224", model, tok, **TIMM_SMALL)
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "--timm-name" in capsys.readouterr().err
