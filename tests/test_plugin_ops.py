"""Operating plugins: provenance in run.json and checkpoints, load control (block and allow lists), the
public testing helpers (`maeframe.testing`), the `new-plugin` template, and discovery (`maeframe plugins
--kind/--plugin`, `maeframe recipe-fields`).

Plugins are written into tmp_path and loaded as a recipe loads them (`plugins: [module]`), or installed as
fake distributions (a *.dist-info folder with an entry_points.txt on sys.path). Training runs use the
synthetic tokenizer and dataset of `maeframe.testing`, so they need no data files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from maeframe import RecipeError, testing
from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.run import make_task
from maeframe.newplugin import write_plugin
from maeframe.plugins import BLOCK_ENV, LOAD_ENV, make_plugin_manager
from maeframe.registry import Registry
from conftest import QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_load_control(monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    monkeypatch.delenv(LOAD_ENV, raising=False)


@pytest.fixture
def write_plugin_module(tmp_path, monkeypatch, request):
    """write_plugin_module(name, source): an importable module `name` in tmp_path, forgotten after the test."""
    folder = tmp_path / "plugin_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name

    return write


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch, request):
    """fake_distribution(dist, version, entry_point, module, source): an installed distribution `dist` whose
    entry point `entry_point` in the group "maeframe" names the module `module` (written from `source`)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(dist: str, version: str, entry_point: str, module: str, source: str) -> None:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[maeframe]\n{entry_point} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        request.addfinalizer(lambda: sys.modules.pop(module, None))

    return install


MASKER = """
    from maeframe import hookimpl
    from maeframe_plugins.masking import RandomMasker

    __version__ = {version!r}

    class {cls}(RandomMasker):
        pass

    @hookimpl
    def register_maskers(register):
        register({name!r}, {cls})
"""
REFUSES_IMPORT = "raise RuntimeError('a plugin that is not allowed to load must not even be imported')\n"


# --- provenance --------------------------------------------------------------------------------------

def test_provenance_lists_the_components_a_recipe_uses(write_plugin_module):
    write_plugin_module("mf_prov", MASKER.format(version="2.5", cls="Stripes", name="stripes"))
    prepared = prepare(QUICKSTART, ["plugins=[mf_prov]", "masker.name=stripes"])
    provenance = prepared.provenance()
    assert list(provenance) == ["tokenizer", "masker", "target", "data.train", "losses.0",  # not all 30 registered
                                "runtime.loggers.0"]
    assert provenance["runtime.loggers.0"]["module"] == "maeframe_plugins.tensorboard_logger.TensorBoardLogger"
    assert provenance["masker"] == {"name": "stripes", "plugin": "mf_prov", "distribution": None, "version": "2.5",
                                    "module": "mf_prov.Stripes"}
    assert provenance["tokenizer"] == {"name": "image_patch", "plugin": "image", "distribution": "maeframe",
                                       "version": "0.1.0", "module": "maeframe_plugins.image.ImagePatchTokenizer"}
    assert provenance["losses.0"]["module"] == "maeframe_plugins.losses.MaskedMSE"
    # components another component builds by name (a curriculum's strategies) are recorded too
    curriculum = prepare(QUICKSTART, ["plugins=[mf_prov]", "masker.name=curriculum",
                                      "masker.options={strategies: [{name: stripes}, {name: block}]}"]).provenance()
    assert curriculum["masker"]["plugin"] == "curriculum"
    assert curriculum["built/masker/stripes"]["version"] == "2.5"
    assert curriculum["built/masker/block"]["plugin"] == "structured_masking"


def test_run_json_and_checkpoints_record_provenance_and_a_resume_names_a_changed_version(
        write_plugin_module, tmp_path, caplog):
    write_plugin_module("mf_versioned", MASKER.format(version="1.0", cls="Versioned", name="versioned"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(testing.tiny_recipe("versioned", tmp_path / "runs", ["mf_versioned"])))
    make_task(prepare(recipe, ["masker.name=versioned"])).train()
    run = tmp_path / "runs" / "versioned"
    facts = json.loads((run / "run.json").read_text())
    assert facts["plugins"]["masker"] == {"name": "versioned", "plugin": "mf_versioned", "distribution": None,
                                          "version": "1.0", "module": "mf_versioned.Versioned"}
    assert facts["plugins"]["tokenizer"]["module"] == "maeframe.testing.PatchTokenizer"
    assert "components" not in facts  # the old listing of every registered component is gone
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["plugins"] == facts["plugins"] and checkpoint["step"] == 4

    # the plugin is upgraded between two processes; resuming says so, naming component and versions
    write_plugin_module("mf_versioned", MASKER.format(version="1.1.0", cls="Versioned", name="versioned"))
    with caplog.at_level(logging.WARNING, logger="maeframe.plugins"):
        make_task(prepare(recipe, ["masker.name=versioned"]), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "masker 'versioned' (plugin mf_versioned): version 1.0 -> 1.1.0" in warnings[0]
    assert str(run / "last.pt") in warnings[0]
    caplog.clear()
    write_plugin_module("mf_versioned", MASKER.format(version="1.0", cls="Versioned", name="versioned"))
    with caplog.at_level(logging.WARNING, logger="maeframe.plugins"):  # the same version: nothing to say
        make_task(prepare(recipe, ["masker.name=versioned"]), resume=True)
    assert not [r for r in caplog.records if "resuming" in r.getMessage()]


# --- load control ------------------------------------------------------------------------------------

def test_allow_list_loads_only_the_named_plugins(monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "masking, image")
    pm = make_plugin_manager()
    assert pm.has_plugin("masking") and pm.has_plugin("image") and not pm.has_plugin("targets")
    assert pm.infos["targets"].status == "not allowed" and pm.infos["masking"].status == "loaded"
    with pytest.raises(RecipeError) as info:
        prepare(QUICKSTART)
    problems = dict(info.value.problems)
    # tokenizer and masker loaded; not the default logger (tensorboard) either
    assert set(problems) == {"target.name", "data.train.name", "losses.0.name", "runtime.loggers.0.name"}
    assert "MAEFRAME_LOAD_PLUGINS=masking,image is set: only the plugins it names load" in problems["target.name"]

    monkeypatch.setenv(LOAD_ENV, "")  # set and empty: nothing loads
    assert not make_plugin_manager().get_plugins()


def test_allow_list_by_distribution_and_recipe_modules(monkeypatch, write_plugin_module):
    write_plugin_module("mf_unlisted", REFUSES_IMPORT)
    write_plugin_module("mf_listed", MASKER.format(version="1", cls="Listed", name="listed"))
    monkeypatch.setenv(LOAD_ENV, "maeframe,mf_listed")  # every built-in (distribution maeframe) + one module
    pm = make_plugin_manager(["mf_unlisted", "mf_listed"])
    assert "mf_unlisted" not in sys.modules and pm.infos["mf_unlisted"].status == "not allowed"
    registry = Registry(pm)
    assert registry.get("masker", "listed").plugin == "mf_listed" and registry.get("masker", "random")


@pytest.mark.parametrize("blocked", ["fakeep", "mf-fake-dist", "MF_Fake.Dist", "mf_fake_mod"])
def test_blocking_any_name_of_an_installed_plugin_also_blocks_its_module_in_a_recipe(
        fake_distribution, monkeypatch, blocked):
    fake_distribution("mf-fake-dist", "0.3", "fakeep", "mf_fake_mod", REFUSES_IMPORT)
    monkeypatch.setenv(BLOCK_ENV, blocked)
    # before: `plugins: [mf_fake_mod]` imported and registered the module under its import name
    pm = make_plugin_manager(["mf_fake_mod"])
    assert "mf_fake_mod" not in sys.modules and pm.infos["fakeep"].status == "blocked"
    assert not pm.has_plugin("mf_fake_mod") and not pm.has_plugin("fakeep")


def test_blocking_a_builtin_by_module_name_covers_the_recipe_field_too(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "maeframe_plugins.masking")
    registry = Registry(make_plugin_manager(["maeframe_plugins.masking"]))
    assert "random" not in registry.entries["masker"]
    monkeypatch.setenv(BLOCK_ENV, "masking")  # the entry-point name blocks the module named in a recipe
    assert "random" not in Registry(make_plugin_manager(["maeframe_plugins.masking"])).entries["masker"]


def test_unknown_names_in_either_list_are_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(BLOCK_ENV, "masking,mf_no_such_plugin_a")
    monkeypatch.setenv(LOAD_ENV, "maeframe,mf-no-such-dist-b")
    with caplog.at_level(logging.WARNING, logger="maeframe.plugins"):
        make_plugin_manager()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("MAEFRAME_BLOCK_PLUGINS names no plugin: 'mf_no_such_plugin_a'") for line in lines)
    assert any(line.startswith("MAEFRAME_LOAD_PLUGINS names no plugin: 'mf-no-such-dist-b'") for line in lines)
    assert not any("'masking'" in line or "'maeframe'" in line for line in lines)


def test_unknown_component_error_says_which_list_is_active(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "masking")
    with pytest.raises(RecipeError) as info:
        prepare(QUICKSTART)
    message = dict(info.value.problems)["masker.name"]
    assert message.endswith("(MAEFRAME_BLOCK_PLUGINS=masking blocks: masking)")
    # docs/plugins.md quotes this message exactly
    assert f"`masker.name: {message}`" in (ROOT / "docs" / "plugins.md").read_text()


def test_plugins_listing_shows_why_a_plugin_did_not_load(monkeypatch, capsys):
    monkeypatch.setenv(BLOCK_ENV, "hog")
    assert main(["plugins", "--plugin", "maeframe"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  hog  maeframe 0\.1\.0  \(entry point maeframe_plugins\.hog\)  not loaded: blocked by "
                     r"MAEFRAME_BLOCK_PLUGINS$", out, re.M)
    assert "  hog  (plugin" not in out  # nor are its components listed


# --- discovery ---------------------------------------------------------------------------------------

def test_plugins_by_kind_shows_types_constraints_and_choices(capsys):
    assert main(["plugins", "--kind", "masker"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("maskers:\n") and "targets:" not in out and "plugins:" not in out
    assert "      ratio: fraction of tokens hidden from the encoder [float >= 0, < 1; default 0.75]\n" in out
    assert re.search(r"^      unit: .+ \[\"epoch\" \| \"step\"; default \"epoch\"\]$", out, re.M)
    assert re.search(r"^      strategies: .+ \[list of StrategyOptions, at least 1 item; default "
                     r"\[\{\"name\": \"random\"\}\]\]$", out, re.M)
    assert main(["plugins", "--kind", "maskerz"]) == 2
    assert "kinds: tokenizer, masker, target, loss, dataset" in capsys.readouterr().err


def test_plugins_by_plugin_lists_its_components_version_and_hooks(write_plugin_module, capsys):
    write_plugin_module("mf_listing", textwrap.dedent(MASKER.format(version="1.2", cls="Listed", name="listed")) + textwrap.dedent("""
        @hookimpl
        def validate_recipe(recipe):
            pass
    """))
    assert main(["plugins", "--module", "mf_listing", "--plugin", "mf_listing"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "maskers:",
        "  listed  (plugin mf_listing; mf_listing.Listed)",
        "      ratio: fraction of tokens hidden from the encoder [float >= 0, < 1; default 0.75]",
        "plugins:",
        "  mf_listing  no distribution, version 1.2  (module mf_listing, imported by name)  "
        "hooks: register_maskers, validate_recipe",
    ]
    assert main(["plugins", "--plugin", "mf_nowhere"]) == 2


def _flat_paths(tree, prefix=""):
    """Dotted paths of a resolved recipe's values; list items as <i>, component options not descended."""
    if isinstance(tree, dict) and not prefix.endswith("options"):
        for key, value in tree.items():
            yield from _flat_paths(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        for item in tree:
            yield from _flat_paths(item, f"{prefix}.<i>")
    else:
        yield prefix


def test_recipe_fields_lists_every_field_of_every_task(capsys):
    assert main(["recipe-fields"]) == 0
    out = capsys.readouterr().out
    sections = dict(re.findall(r"^task: (\w+).*\n((?:  .*\n)+)", out, re.M))
    assert list(sections) == ["pretrain", "finetune", "linprobe", "knn", "retrieval"]
    for task in sections:
        assert re.search(r"^  runtime\.max_steps: stop after this many optimizer steps \(smoke runs\) "
                         r"\[int \| null, > 0; default null\]", sections[task], re.M)
    assert "  optim.epochs: training epochs [int > 0; required]\n" in sections["pretrain"]
    assert re.search(r"^  runtime\.max_steps: .*\(refused by a knn run, which trains nothing", sections["knn"], re.M)
    # every value a resolved recipe holds has its line (component options are `maeframe plugins`' business)
    for task, recipe in (("pretrain", QUICKSTART), ("finetune", QUICKSTART.parent / "finetune_fmnist.yaml")):
        dumped = prepare(recipe).recipe.model_dump(mode="json")
        listed = {line.split(":")[0].strip() for line in sections[task].splitlines()}
        assert set(_flat_paths(dumped)) <= listed, set(_flat_paths(dumped)) - listed
    assert main(["recipe-fields", "batch_size", "--task", "knn"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "task: knn", "  data.batch_size: samples per step on one device (before accumulation) [int > 0; required]"]


@pytest.mark.parametrize("argv", [["recipe-fields"], ["recipe-fields", "--help"], ["new-plugin", "--help"],
                                  ["plugins", "--help"]])
def test_new_subcommands_import_no_torch(argv):
    code = ("import sys\nfrom maeframe.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)" % (argv,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


# --- maeframe.testing --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, grid", [
    ("random", {}, (4, 4)), ("block", {"min_block": 4}, (8, 8)), ("time_freq", {}, (8, 8)), ("tube", {}, (2, 4, 4)),
    ("running_cell", {}, (2, 4, 4)),
    ("curriculum", {"strategies": [{"name": "random"}, {"name": "block", "options": {"min_block": 4}}],
                    "probs_start": [0.5, 0.5], "start": 0.5, "end": 0.9}, (8, 8)),
])
def test_builtin_maskers_pass_the_masker_checks(name, options, grid):
    tokenizer = testing.make_tokenizer(grid=grid, patch_size=(2,) * len(grid))
    build = lambda: testing.build_component("masker", name, options, tokenizer=tokenizer)  # noqa: E731
    mask = testing.check_masker(build())
    assert mask.ids_restore.shape == (4, tokenizer.spec.num_tokens)
    testing.check_masker_resume(build)


FAULTY_MASKERS = """
    import torch
    from maeframe import Mask, Masker, hookimpl

    class Reads(Masker):          # .item() on a device tensor: a host sync
        def __call__(self, batch_size, device):
            noise = torch.rand(batch_size, self.spec.num_tokens, device=device)
            return Mask.from_noise(noise, 4 + int(noise.max().item() > 2))

    class Indexes(Masker):        # boolean indexing: a value-dependent shape
        def __call__(self, batch_size, device):
            noise = torch.rand(batch_size, self.spec.num_tokens, device=device)
            return Mask.from_noise(noise[noise >= 0].view(batch_size, -1), 4)

    class FromBool(Masker):       # Mask.from_bool checks its counts on the host
        def __call__(self, batch_size, device):
            ranks = torch.rand(batch_size, self.spec.num_tokens, device=device).argsort(1).argsort(1)
            return Mask.from_bool(ranks >= 4)

    class Ragged(Masker):         # the number of visible tokens changes between calls
        calls = 0
        def __call__(self, batch_size, device):
            self.calls += 1
            return Mask.from_noise(torch.rand(batch_size, self.spec.num_tokens, device=device), 3 + self.calls % 2)

    class Forgets(Masker):        # counts its calls but does not save the count: a resume draws other masks
        def __init__(self, options, spec):
            super().__init__(options, spec)
            self.calls = 0
        def __call__(self, batch_size, device):
            self.calls += 1
            noise = torch.rand(batch_size, self.spec.num_tokens, device=device)
            return Mask.from_noise(noise, 2 + self.calls % 3)

    class BadState(Forgets):      # state a checkpoint cannot hold
        def state_dict(self):
            return {"calls": self.calls, "when": object()}

    class Copies(Masker):         # moves a host table to the device on every call: a blocking copy on a GPU
        def __init__(self, options, spec):
            super().__init__(options, spec)
            self.table = torch.arange(spec.num_tokens)
        def __call__(self, batch_size, device):
            noise = torch.rand(batch_size, self.spec.num_tokens, device=device) + self.table.to(device)
            return Mask.from_noise(noise, 4)

    class Keeps(Copies):          # the same table, moved once per device and kept: fine
        def __call__(self, batch_size, device):
            if device not in self.__dict__.setdefault("tables", {}):
                self.tables[device] = self.table.to(device)
            noise = torch.rand(batch_size, self.spec.num_tokens, device=device) + self.tables[device]
            return Mask.from_noise(noise, 4)

    @hookimpl
    def register_maskers(register):
        for cls in (Reads, Indexes, FromBool, Ragged, Forgets, BadState, Copies, Keeps):
            register(cls.__name__.lower(), cls)
"""


@pytest.mark.parametrize("name, message", [
    ("reads", r"calls Tensor\.item\(\) on a tensor on the device it was asked for"),
    ("indexes", r"uses boolean indexing on a device tensor"),
    ("frombool", r"calls __bool__\(\) on a tensor on the device"),
    ("ragged", r"call 2 with batch size 1 keeps 3 tokens, an earlier call kept 4: shapes must be static"),
    ("copies", r"copies host data to the device on every call \(to\)"),
])
def test_check_masker_catches_host_syncs_and_dynamic_shapes(write_plugin_module, name, message):
    write_plugin_module("mf_faulty", FAULTY_MASKERS)
    masker = testing.build_component("masker", name, plugins=["mf_faulty"])
    with pytest.raises(AssertionError, match=message):
        testing.check_masker(masker)


def test_check_masker_accepts_device_tables_kept_after_the_first_call(write_plugin_module, monkeypatch):
    write_plugin_module("mf_faulty", FAULTY_MASKERS)
    testing.check_masker(testing.build_component("masker", "keeps", plugins=["mf_faulty"]))
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "maeframe-plugin-example" / "src"))  # grid does the same
    grid = testing.build_component("masker", "grid", {"random_offset": True}, plugins=["maeframe_plugin_example"])
    assert testing.check_masker(grid).num_visible == 4


def test_check_masker_resume_catches_state_missing_from_state_dict(write_plugin_module):
    write_plugin_module("mf_faulty", FAULTY_MASKERS)
    build = lambda name: lambda: testing.build_component("masker", name, plugins=["mf_faulty"])  # noqa: E731
    with pytest.raises(AssertionError, match=r"state_dict\(\) misses state"):
        testing.check_masker_resume(build("forgets"))
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        testing.check_masker_resume(build("badstate"))


def test_build_component_validates_options_and_passes_constructor_errors():
    with pytest.raises(ValidationError):
        testing.build_component("masker", "random", {"ratio": 1.5})
    with pytest.raises(ValueError, match="3-D"):
        testing.build_component("masker", "tube", {})  # the default 4×4 grid is 2-D
    with pytest.raises(ValueError, match="unknown kind"):
        testing.build_component("maskers", "random")
    target = testing.build_component("target", "pixel", {"norm_pix": False})
    tokens = testing.make_tokens(target.tokenizer, batch_size=2)
    assert torch.equal(target(tokens, testing.check_masker(testing.build_component("masker", "random"))).values,
                       tokens.patches)


def test_patch_tokenizer_and_synthetic_dataset():
    tokenizer = testing.make_tokenizer(grid=(2, 3, 4), patch_size=(1, 2, 3), channels=2)
    assert tokenizer.input_shape == (2, 2, 6, 12) and tokenizer.spec.patch_dim == 12
    batch = testing.make_batch(tokenizer, 3)
    tokens = tokenizer.tokenize(batch)
    assert tokens.patches.shape == (3, 24, 12) and torch.equal(tokenizer.untokenize(tokens.patches), batch)
    # each token is one patch laid out (*patch_size, channels): token (0, 1, 2) holds x[:, 0:1, 2:4, 6:9]
    assert torch.equal(tokens.patches[0, 1 * 4 + 2], batch[0, :, 0:1, 2:4, 6:9].permute(1, 2, 3, 0).flatten())
    dataset = testing.build_component("dataset", "testing.synthetic", {"size": 5}, plugins=["maeframe.testing"],
                                      input_shape=(1, 8, 8))
    assert len(dataset) == 5 and dataset[3][0].shape == (1, 8, 8) and dataset[3][1] == 3
    assert torch.equal(dataset[3][0], dataset[3][0]) and not torch.equal(dataset[3][0], dataset[4][0])


def test_train_steps_swaps_a_plugin_component_into_a_tiny_run(write_plugin_module, tmp_path):
    write_plugin_module("mf_halves", """
        from maeframe import TargetOut, hookimpl
        from maeframe_plugins.targets import PixelTarget

        class Halves(PixelTarget):
            def __call__(self, tokens, mask):
                return TargetOut(super().__call__(tokens, mask).values / 2)

        @hookimpl
        def register_targets(register):
            register("halves", Halves)
    """)
    run = testing.train_steps("target", "halves", {"norm_pix": False}, plugins=["mf_halves"], directory=tmp_path)
    assert [line["step"] for line in run.metrics] == [1, 2, 3, 4] and run.final["loss"] > 0
    assert run.facts["plugins"]["target"] == {"name": "halves", "plugin": "mf_halves", "distribution": None,
                                              "version": None, "module": "mf_halves.Halves"}
    assert (run.run_dir / "reconstructions" / "epoch0001.png").is_file()
    assert type(run.trainer.prepared.components.target).__name__ == "Halves"


# --- the plugin template -----------------------------------------------------------------------------

def test_new_plugin_writes_a_distribution_whose_tests_pass(tmp_path, capsys):
    assert main(["new-plugin", "my-lab", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "maeframe-my-lab"
    assert f"wrote {root}" in capsys.readouterr().out
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert files == ["README.md", "pyproject.toml", "src/maeframe_my_lab/__init__.py", "src/maeframe_my_lab/loss.py",
                     "src/maeframe_my_lab/masker.py", "src/maeframe_my_lab/target.py", "tests/test_components.py",
                     "tests/test_training.py"]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "maeframe-my-lab"
    assert pyproject["project"]["entry-points"]["maeframe"] == {"my_lab": "maeframe_my_lab"}
    assert "{{" not in "".join((root / f).read_text() for f in files)
    # its own tests, as generated, from its folder (pyproject puts src/ on sys.path), in a fresh process
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root,
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k not in (BLOCK_ENV, LOAD_ENV)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b8 passed\b", result.stdout)
    # and maeframe finds its components by module name
    sys.path.insert(0, str(root / "src"))
    try:
        registry = Registry(make_plugin_manager(["maeframe_my_lab"]))
        assert {registry.get(kind, f"my_lab_{kind}").plugin for kind in ("masker", "target", "loss")} == {"maeframe_my_lab"}
    finally:
        sys.path.remove(str(root / "src"))
        for module in [m for m in sys.modules if m.startswith("maeframe_my_lab")]:
            del sys.modules[module]


def test_new_plugin_refuses_bad_names_and_existing_folders(tmp_path, capsys):
    assert main(["new-plugin", "9lives", "--dir", str(tmp_path)]) == 2
    assert "must start with a letter" in capsys.readouterr().err
    write_plugin("lab", tmp_path)
    assert main(["new-plugin", "maeframe-lab", "--dir", str(tmp_path)]) == 2  # the prefix is not doubled
    assert "already exists" in capsys.readouterr().err


def test_the_template_ships_as_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-data"]["*"] == ["*.tmpl"]
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "maeframe" / "templates").rglob("*.tmpl")}
    assert folders and folders <= set(setuptools["packages"])
