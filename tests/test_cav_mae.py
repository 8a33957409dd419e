"""CAV-MAE: the paper recipe validates; the CPU recipe trains on the spoken-letter pairs and draws both
modalities; the retrieval task on a joint checkpoint equals a direct computation and refuses other checkpoints."""
import json

import pytest
import torch

from conftest import QUICKSTART, RECIPES, tiny
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import FORMAT, atomic_save, load_checkpoint
from maeframe.masker import Mask
from maeframe.model.joint import JointMaskedAutoencoder
from maeframe_plugins.spoken_letters import SpokenLettersDataset, SpokenLettersOptions

LANGUAGES = "[en, fr]"
SMALL = ["model.embed_dim=32", "model.num_heads=2", "model.depth=2", "model.modality_blocks=1",
         "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"]
DATA = [f"data.{split}.options.{key}={value}" for split in ("train", "eval")
        for key, value in (("languages", LANGUAGES), ("cache_dir", "null"))]  # no fbank cache in ~/.cache


def test_paper_recipe_validates(capsys):
    assert main(["validate", str(RECIPES / "cav_mae_vitb.yaml")]) == 0
    assert "audio grid (64, 8), 512 tokens" in capsys.readouterr().out


@pytest.fixture(scope="module")
def joint_checkpoint(tmp_path_factory):
    """The CPU recipe, shrunk (2 of its 15 languages, a 32-wide model), trained for one epoch of 5 steps."""
    out = tmp_path_factory.mktemp("joint")
    overrides = SMALL + DATA + ["optim.epochs=1", "optim.warmup_epochs=0", "data.batch_size=8",
                                "data.num_workers=0", "runtime.visualize_interval=1", "runtime.log_interval=1",
                                f"runtime.output_dir={out}"]
    assert main(["run", str(RECIPES / "cav_mae_klettres.yaml"), *overrides]) == 0
    run = out / "cav_mae_klettres"
    prepared = prepare(RECIPES / "cav_mae_klettres.yaml", overrides)
    flows = prepared.modalities
    model = JointMaskedAutoencoder({n: c.tokenizer.spec for n, c in flows.items()},
                                   {n: c.target.out_dim for n, c in flows.items()}, prepared.recipe.model, typed=True)
    model.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    return run, prepared, model


def test_cpu_recipe_trains_and_draws_both_modalities(joint_checkpoint):
    run, _, _ = joint_checkpoint
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss/joint/contrastive" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5]
    for line in steps:
        expected = line["loss/audio/mse"] + line["loss/visual/mse"] + 0.01 * line["loss/joint/contrastive"]
        assert line["loss"] == pytest.approx(expected, rel=1e-4)
    for modality in ("audio", "visual"):
        assert (run / "reconstructions" / modality / "epoch0001.png").stat().st_size > 1000


def retrieval(tmp_path, checkpoint, *extra):
    return main(["run", str(RECIPES / "retrieval_klettres.yaml"), f"init.checkpoint={checkpoint}",
                 f"runtime.output_dir={tmp_path}", *DATA, *extra])


def test_retrieval_equals_a_direct_computation(tmp_path, joint_checkpoint):
    run, prepared, model = joint_checkpoint
    assert retrieval(tmp_path, run / "last.pt") == 0
    results = json.loads((tmp_path / "retrieval_klettres" / "results.json").read_text())
    final = results["final"]
    assert results["modalities"] == ["audio", "visual"] and results["representation"] == "separate"
    # the held-out pairs embedded by hand: each modality alone, all tokens visible, the model's pooled latent
    shapes = {n: c.tokenizer.input_shape for n, c in prepared.modalities.items()}
    options = SpokenLettersOptions(**prepared.recipe.data.eval.options)
    pairs = SpokenLettersDataset(options, shapes, train=False)
    samples = [pairs[i][0] for i in range(len(pairs))]
    embedded = {}
    with torch.no_grad():
        model.eval()
        for name, flow in prepared.modalities.items():
            patches = flow.tokenizer.tokenize(torch.stack([s[name] for s in samples])).patches
            ids = torch.arange(patches.shape[1]).expand(len(samples), -1)
            _, pooled = model.encoder({name: patches}, {name: Mask(ids, ids, torch.zeros(ids.shape))})
            embedded[name] = torch.nn.functional.normalize(pooled[name], dim=1)
    assert results["pairs"] == len(pairs) and results["chance"]["R@1"] == pytest.approx(1 / len(pairs))
    for query, key in (("audio", "visual"), ("visual", "audio")):
        similarity = embedded[query] @ embedded[key].T
        rank = (similarity >= similarity.diagonal()[:, None]).sum(1)  # 1 + keys at least as close as the match
        for k in (1, 5, 10):
            got = final[f"retrieval/{query}_to_{key}/R@{k}"]
            assert 0 <= got <= 1 and got == pytest.approx((rank <= k).float().mean().item(), abs=1e-6)
    assert 0 <= final["knn/audio/top1"] <= 1 and 0 <= final["knn/visual/top1"] <= 1


def test_retrieval_refuses_a_single_modality_checkpoint(tmp_path, capsys):
    single = tmp_path / "single.pt"
    recipe = prepare(QUICKSTART, tiny(tmp_path)).recipe
    atomic_save({"format": FORMAT, "step": 1, "recipe": recipe.model_dump(mode="json"), "model": {}}, single)
    assert retrieval(tmp_path, single) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "init.checkpoint" in err and "single-modality" in err
    assert retrieval(tmp_path, tmp_path / "absent.pt") == 2
    assert "init.checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "retrieval_klettres").exists()


def test_contrastive_term_alone_trains_both_stems_and_fits_fixed_pairs():
    """The contrastive path end to end (benchmarks/cav_mae_diagnose.py): its gradient reaches both modalities'
    patch embeddings and own blocks, each recording is paired with a drawing of its own letter, and
    contrastive-only training fits 8 fixed training pairs (audio->visual R@1 1, from chance)."""
    prepared = prepare(RECIPES / "cav_mae_klettres.yaml", SMALL + DATA)
    flows = prepared.modalities
    torch.manual_seed(0)
    model = JointMaskedAutoencoder({n: c.tokenizer.spec for n, c in flows.items()},
                                   {n: c.target.out_dim for n, c in flows.items()}, prepared.recipe.model, typed=True)
    shapes = {n: c.tokenizer.input_shape for n, c in flows.items()}
    pairs = SpokenLettersDataset(SpokenLettersOptions(**prepared.recipe.data.train.options), shapes, train=True)
    assert [pairs.classes[label] for _, label in pairs.audio.items] == pairs.letters
    picks = [pairs.letters.index(letter) for letter in sorted(set(pairs.letters))[:8]]  # 8 distinct letters
    samples = [pairs[i] for i in picks]
    assert [pairs.classes[label] for _, label in samples] == [pairs.letters[i] for i in picks]
    patches = {n: flows[n].tokenizer.tokenize(torch.stack([s[n] for s, _ in samples])).patches for n in flows}
    ids = torch.arange(max(p.shape[1] for p in patches.values()))
    visible = {n: Mask(ids[:p.shape[1]].expand(8, -1), ids[:p.shape[1]].expand(8, -1), torch.zeros(p.shape[:2]))
               for n, p in patches.items()}
    (loss,) = [loss for _, _, loss in prepared.joint_losses]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def contrastive():
        predictions = model(patches, visible)
        return loss(predictions, visible), predictions

    first, _ = contrastive()
    first.backward()
    for name in ("audio", "visual"):
        for part in ("patch_embed.weight", "blocks.0.attn.qkv.weight"):
            assert model.get_parameter(f"encoder.modalities.{name}.{part}").grad.norm() > 0
    for _ in range(60):
        optimizer.zero_grad()
        value, _ = contrastive()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        value, predictions = contrastive()
    audio, visual = (torch.nn.functional.normalize(predictions[n].pooled, dim=1) for n in ("audio", "visual"))
    assert value < 0.1 * first
    assert ((audio @ visual.T).argmax(1) == torch.arange(8)).all()
