import pytest

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.errors import RecipeError
from maeframe.recipe import load_recipe
from maeframe.recipe_file import apply_override
from conftest import QUICKSTART, RECIPES


@pytest.mark.parametrize("path", sorted(RECIPES.glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    prepared = prepare(path)
    flows = prepared.modalities or ({"": prepared.components} if prepared.components else {})
    if prepared.recipe.task == "retrieval":  # its tokenizers come from init.checkpoint's recipe, at run time
        assert not flows
    else:
        assert flows and all(c.tokenizer.spec.num_tokens > 0 for c in flows.values())


def test_paper_recipes_hold_the_paper_settings():
    for name, dim, depth, patch in [("vitb", 768, 12, 16), ("vitl", 1024, 24, 16), ("vith", 1280, 32, 14)]:
        recipe = load_recipe(RECIPES / f"image_mae_{name}.yaml")
        assert (recipe.model.embed_dim, recipe.model.depth) == (dim, depth)
        assert recipe.tokenizer.options == {"image_size": 224, "patch_size": patch, "channels": 3}
        assert recipe.masker.options["ratio"] == 0.75 and recipe.target.options["norm_pix"] is True
        assert (recipe.model.decoder_depth, recipe.model.decoder_embed_dim) == (8, 512)
        assert recipe.data.batch_size * recipe.optim.accum_steps == 4096
        assert (recipe.optim.base_lr, recipe.optim.epochs, recipe.optim.warmup_epochs) == (1.5e-4, 800, 40)
        assert recipe.data.train.options["crop_scale"] == [0.2, 1.0]


@pytest.mark.parametrize("override,path,message", [
    ("optim.epochz=3", "optim.epochz", "Extra inputs are not permitted"),
    ("data.batch_size=many", "data.batch_size", "valid integer"),
    ("masker.name=nonexistent", "masker.name", "unknown masker 'nonexistent'"),
    ("masker.options.ratio=1.5", "masker.options.ratio", "less than 1"),
    ("masker.options.rate=0.5", "masker.options.rate", "Extra inputs"),
    ("model.num_heads=5", "model", "not divisible"),
    ("tokenizer.options.patch_size=3", "tokenizer.options", "does not divide"),
])
def test_bad_recipes_name_the_field(override, path, message):
    with pytest.raises(RecipeError) as err:
        prepare(QUICKSTART, [override])
    paths = [p for p, _ in err.value.problems]
    assert path in paths, err.value.problems
    assert message in str(err.value)


def test_overrides_parse_yaml_values_and_list_indices():
    tree = {"optim": {"lr": None}, "losses": [{"name": "mse", "weight": 1.0}]}
    apply_override(tree, "optim.lr=1e-3")
    apply_override(tree, "losses.0.weight=2")
    apply_override(tree, "runtime.compile=true")
    assert tree == {"optim": {"lr": 1e-3}, "losses": [{"name": "mse", "weight": 2}], "runtime": {"compile": True}}
    with pytest.raises(RecipeError, match="not an index"):
        apply_override(tree, "losses.3.weight=1")
    with pytest.raises(RecipeError, match="dotted.key=value"):
        apply_override(tree, "optim.lr")


def test_resolved_options_carry_defaults():
    prepared = prepare(QUICKSTART)
    assert prepared.recipe.target.options == {"norm_pix": True, "eps": 1e-6, "norm_over": "patch", "eps_after_sqrt": False}


def test_cli_rejects_a_bad_recipe_before_writing_anything(tmp_path, capsys):
    code = main(["run", str(QUICKSTART), f"runtime.output_dir={tmp_path / 'out'}", "masker.options.ratio=2"])
    assert code == 2
    assert "masker.options.ratio" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_validate(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(QUICKSTART.read_text().replace("name: random", "name: randm"))
    assert main(["validate", str(QUICKSTART)]) == 0
    capsys.readouterr()
    assert main(["validate", str(broken), str(QUICKSTART)]) == 2  # a user mistake: 2, and the next is still checked
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "broken.yaml" in err and "masker.name" in err and "randm" in err
    assert f"{QUICKSTART}: ok" in out


def test_non_mapping_and_missing_files_are_clear(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["validate", "--help"], ["plugins", "--help"],
                                  ["export", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: maeframe" in capsys.readouterr().out


def test_plugins_lists_components_with_plugin_and_options(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "maskers:" in out and "random  (plugin masking, maeframe 0.1.0" in out
    assert "ratio: fraction of tokens hidden from the encoder [float >= 0, < 1; default 0.75]" in out
    assert "fashion_mnist" in out and "image_patch" in out and "pixel" in out and "mse" in out


@pytest.mark.parametrize("recipe", [QUICKSTART, QUICKSTART.parent / "finetune_fmnist.yaml"], ids=["pretrain", "finetune"])
def test_cuda_graphs_refuse_gradient_accumulation(recipe):
    """CUDA graphs overwrite the gradients they produced on the next replay, so accumulated gradients would be
    silently wrong (pytorch/pytorch#169545)."""
    graphs = ["runtime.compile=true", "runtime.compile_mode=reduce-overhead"]
    with pytest.raises(RecipeError) as err:
        prepare(recipe, [*graphs, "optim.accum_steps=2"])
    assert [p for p, _ in err.value.problems] == ["runtime.compile_mode"]
    assert "optim.accum_steps=2" in str(err.value)
    assert prepare(recipe, [*graphs, "optim.accum_steps=1"]).recipe.runtime.compile_mode == "reduce-overhead"
