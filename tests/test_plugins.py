"""The plugin system end to end: a real third-party distribution, faulty plugins, blocking, provenance,
and every hook in maeframe/hookspecs.py.

The example plugin (examples/maeframe-plugin-example) is built into a wheel and installed into a private
folder once per module; subprocesses see it through PYTHONPATH, in-process tests through sys.path.
The training runs read real Fashion-MNIST (conftest.py stops the session when it is missing).
Plugin modules for the failure cases are written into tmp_path and loaded by import name, the way a
recipe's `plugins:` list loads them.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maeframe import PluginError, RecipeError, TokenSpec, hookspecs
from maeframe.build import prepare
from maeframe.plugins import BLOCK_ENV, make_plugin_manager, plugin_distribution
from maeframe.registry import KINDS, Registry
import conftest
from conftest import QUICKSTART, tiny
from maeframe.engine.checkpoint import atomic_save, load_checkpoint
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "maeframe-plugin-example"

TINY = [*conftest.TINY, "optim.epochs=1", "runtime.device=cpu", "runtime.log_interval=50"]  # a few CPU seconds
# The grid masker needs a grid divisible by its stride: 28 px / 7 px patches = a 4×4 grid.
GRID = ["masker.name=grid", "masker.options={stride: 2}", "tokenizer.options.patch_size=7"]


@pytest.fixture(autouse=True)
def _no_blocked_plugins(monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)


# --- the example distribution ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example plugin built as a wheel and installed (with its dist-info) into a private folder."""
    tmp = tmp_path_factory.mktemp("example-dist")
    source = tmp / "source"  # build a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "__pycache__", ".pytest_cache", "build", "dist", "*.egg-info"))
    site = tmp / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    if importlib.util.find_spec("setuptools") is not None:
        subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                              "-w", str(tmp / "wheel"), str(source)], check=True)
        wheel, = (tmp / "wheel").glob("maeframe_plugin_example-*.whl")
        subprocess.run(pip + ["install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                       check=True)
    else:  # no setuptools here: let pip build it in an isolated environment
        subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(site), str(source)], check=True)
    assert (site / "maeframe_plugin_example" / "grid.py").is_file()
    assert list(site.glob("maeframe_plugin_example-*.dist-info/entry_points.txt"))
    return site


def run_maeframe(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != BLOCK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "maeframe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_installed_plugin_is_listed_with_its_distribution_and_options(example_site, tmp_path):
    result = run_maeframe(example_site, tmp_path, "plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.strip().startswith("grid ")]
    assert len(header) == 1, result.stdout
    assert re.fullmatch(r"\s+grid\s+\(plugin example, maeframe[-_]plugin[-_]example 0\.1\.0; "
                        r"maeframe_plugin_example\.grid\.GridMasker\)", lines[header[0]])
    # the option lines follow the component line
    options = lines[header[0] + 1: header[0] + 3]
    assert re.fullmatch(r"\s+stride: .+\S \[int >= 2; default 2\]", options[0])  # type, constraint, default
    assert re.fullmatch(r"\s+random_offset: .+\S \[bool; default false\]", options[1])
    # the plugin itself: distribution, version, module and hooks
    assert re.search(r"^  example  maeframe[-_]plugin[-_]example 0\.1\.0  \(entry point maeframe_plugin_example\)  "
                     r"hooks: register_maskers$", result.stdout, re.M)
    assert lines.index("maskers:") < header[0] < lines.index("targets:")


def test_installed_plugin_trains_from_a_recipe(example_site, tmp_path):
    out = tmp_path / "runs"
    result = run_maeframe(example_site, tmp_path, "run", str(QUICKSTART), *GRID, *TINY,
                          f"runtime.output_dir={out}")
    assert result.returncode == 0, result.stderr
    run_dir = out / "quickstart"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 4 and math.isfinite(metrics[-1]["loss"])
    facts = json.loads((run_dir / "run.json").read_text())
    provenance = dict(facts["plugins"]["masker"])
    assert provenance.pop("distribution").replace("_", "-") == "maeframe-plugin-example"
    assert provenance == {"name": "grid", "plugin": "example", "version": "0.1.0",
                          "module": "maeframe_plugin_example.grid.GridMasker"}
    assert facts["plugins"]["target"]["plugin"] == "targets" and "masker/random" not in json.dumps(facts)
    assert torch.load(run_dir / "last.pt", weights_only=True)["plugins"] == facts["plugins"]
    assert "grid" in (run_dir / "recipe.yaml").read_text()


def test_grid_masker_keeps_one_token_per_cell(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    pm = make_plugin_manager()
    entry = Registry(pm).get("masker", "grid")
    assert entry.plugin == "example"
    assert re.fullmatch(r"maeframe[-_]plugin[-_]example 0\.1\.0", plugin_distribution(pm, "example"))
    cls = entry.cls
    spec = TokenSpec(grid=(4, 4), patch_size=(7, 7), channels=1)

    mask = cls(cls.Options(stride=2), spec)(5, torch.device("cpu"))
    # top-left token of each 2×2 cell: (0,0) (0,2) (2,0) (2,2) -> 0 2 8 10, the same in every sample
    assert mask.ids_keep.tolist() == [[0, 2, 8, 10]] * 5
    hidden = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(mask.masked, hidden.flatten().expand(5, -1))
    assert mask.masked.sum(1).tolist() == [12.0] * 5
    assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), torch.arange(4).expand(5, -1))

    torch.manual_seed(0)
    shifted = cls(cls.Options(stride=2, random_offset=True), spec)(32, torch.device("cpu"))
    assert shifted.ids_keep.shape == (32, 4) and shifted.masked.sum(1).tolist() == [12.0] * 32
    rows, cols = shifted.ids_keep // 4, shifted.ids_keep % 4
    assert torch.equal(rows % 2, (rows[:, :1] % 2).expand(-1, 4))  # one offset per sample ...
    assert torch.equal(cols % 2, (cols[:, :1] % 2).expand(-1, 4))
    assert len(set(zip((rows[:, 0] % 2).tolist(), (cols[:, 0] % 2).tolist()))) == 4  # ... drawn per sample

    with pytest.raises(ValueError, match="not divisible"):
        cls(cls.Options(), TokenSpec(grid=(7, 7), patch_size=(4, 4), channels=1))
    with pytest.raises(ValueError, match="2-D"):
        cls(cls.Options(), TokenSpec(grid=(4, 4, 4), patch_size=(2, 4, 4), channels=1))


def test_block_env_switches_off_an_installed_plugin(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setenv(BLOCK_ENV, "example")
    registry = Registry(make_plugin_manager())
    assert "grid" not in registry.entries["masker"] and "random" in registry.entries["masker"]


def test_recipe_may_list_an_installed_plugin_module(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    registry = Registry(make_plugin_manager(["maeframe_plugin_example"]))
    assert registry.get("masker", "grid").plugin == "example"


# --- faulty plugins ----------------------------------------------------------------------------------

@pytest.fixture
def write_plugin(tmp_path, monkeypatch, request):
    """write_plugin(name, source): an importable module `name` in tmp_path, forgotten after the test."""
    folder = tmp_path / "plugin_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name

    return write


def load_registry(*modules: str) -> Registry:
    return Registry(make_plugin_manager(list(modules)))


def test_error_raised_inside_a_registration_hook_names_plugin_and_hook(write_plugin):
    write_plugin("mf_raises", """
        from maeframe import hookimpl

        @hookimpl
        def register_maskers(register):
            raise RuntimeError("boom while registering")
    """)
    with pytest.raises(PluginError) as info:
        load_registry("mf_raises")
    message = str(info.value)
    assert "'mf_raises'" in message and "register_maskers" in message and "boom while registering" in message


def test_registering_a_class_of_the_wrong_base_names_plugin_and_base(write_plugin):
    write_plugin("mf_wrong_base", """
        from maeframe import hookimpl

        class NotAMasker:
            pass

        @hookimpl
        def register_maskers(register):
            register("not_a_masker", NotAMasker)
    """)
    with pytest.raises(PluginError) as info:
        load_registry("mf_wrong_base")
    message = str(info.value)
    assert "'mf_wrong_base'" in message and "maeframe.Masker" in message and "'not_a_masker'" in message


MASKER_PLUGIN = """
    from maeframe import hookimpl
    from maeframe_plugins.masking import RandomMasker

    class Twin(RandomMasker):
        pass

    @hookimpl
    def register_maskers(register):
        register({name!r}, Twin)
"""


def test_two_plugins_registering_one_name_are_both_named(write_plugin):
    write_plugin("mf_twin_a", MASKER_PLUGIN.format(name="twin"))
    write_plugin("mf_twin_b", MASKER_PLUGIN.format(name="twin"))
    with pytest.raises(PluginError) as info:
        load_registry("mf_twin_a", "mf_twin_b")
    message = str(info.value)
    assert "'twin'" in message and "'mf_twin_a'" in message and "'mf_twin_b'" in message

    write_plugin("mf_shadows_builtin", MASKER_PLUGIN.format(name="random"))
    with pytest.raises(PluginError, match=r"'random' is registered twice.*'masking'.*'mf_shadows_builtin'"):
        load_registry("mf_shadows_builtin")


def test_misspelt_hook_name_is_an_error_naming_the_plugin(write_plugin):
    write_plugin("mf_typo", """
        from maeframe import hookimpl

        @hookimpl
        def register_maskerz(register):
            pass
    """)
    with pytest.raises(PluginError) as info:
        make_plugin_manager(["mf_typo"])
    message = str(info.value)
    assert "mf_typo" in message and "register_maskerz" in message


def test_module_that_fails_to_import_names_module_and_recipe_field(write_plugin):
    write_plugin("mf_broken_import", """
        import maeframe_no_such_dependency  # noqa: F401
    """)
    with pytest.raises(PluginError) as info:
        make_plugin_manager(["mf_broken_import"])
    message = str(info.value)
    assert "'mf_broken_import'" in message and "'plugins'" in message and "maeframe_no_such_dependency" in message

    with pytest.raises(PluginError, match=r"'mf_not_written'.*'plugins'"):
        make_plugin_manager(["mf_not_written"])


def test_unknown_component_name_is_a_recipe_error_at_its_field():
    with pytest.raises(RecipeError) as info:
        prepare(QUICKSTART, ["masker.name=no_such_masker"])
    assert [path for path, _ in info.value.problems] == ["masker.name"]
    assert "no_such_masker" in str(info.value) and "random" in str(info.value)  # lists the known ones
    assert info.value.source == str(QUICKSTART)


# --- blocking and provenance ----------------------------------------------------------------------

def test_block_env_blocks_a_builtin_plugin(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "masking")
    pm = make_plugin_manager()
    assert not pm.has_plugin("masking") and pm.has_plugin("targets")
    registry = Registry(pm)
    assert "random" not in registry.entries["masker"] and "pixel" in registry.entries["target"]
    with pytest.raises(PluginError, match="unknown masker 'random'"):
        registry.get("masker", "random")
    with pytest.raises(RecipeError) as info:
        prepare(QUICKSTART)
    assert [path for path, _ in info.value.problems] == ["masker.name"]


def test_block_env_blocks_a_recipe_listed_module(write_plugin, monkeypatch):
    write_plugin("mf_blocked", """
        raise RuntimeError("a blocked plugin must not even be imported")
    """)
    monkeypatch.setenv(BLOCK_ENV, " masking , mf_blocked ")  # comma-separated, spaces ignored
    pm = make_plugin_manager(["mf_blocked"])
    assert "mf_blocked" not in sys.modules and not pm.has_plugin("mf_blocked")
    assert not pm.has_plugin("masking")


def test_registry_records_which_plugin_supplied_each_component(write_plugin):
    write_plugin("mf_extra_masker", MASKER_PLUGIN.format(name="extra"))
    pm = make_plugin_manager(["mf_extra_masker"])
    registry = Registry(pm)
    builtin = registry.get("masker", "random")
    assert builtin.plugin == "masking" and builtin.cls.__module__ == "maeframe_plugins.masking"
    assert plugin_distribution(pm, "masking").startswith("maeframe ")
    extra = registry.get("masker", "extra")
    assert extra.plugin == "mf_extra_masker" and plugin_distribution(pm, "mf_extra_masker") is None
    assert registry.get("tokenizer", "image_patch").plugin == "image"
    assert registry.get("dataset", "fashion_mnist").plugin == "image_data"


# --- every hook ------------------------------------------------------------------------------------

EXERCISED_HOOKS = {
    # registration: a third-party plugin implementing all five (and the built-ins, which use them too)
    "register_tokenizers", "register_maskers", "register_targets", "register_losses", "register_datasets",
    # recipe and lifecycle
    "validate_recipe", "on_train_start", "log_metrics", "on_epoch_end", "on_train_end",
    # command line: test_a_plugin_adds_a_subcommand_through_register_commands
    "register_commands",
    # weight formats: test_a_plugin_supplies_a_weight_format_for_init_format
    "register_weight_formats",
    # experiment trackers: test_every_registration_hook_from_a_plugin, tests/test_trackers.py
    "register_loggers",
}


def test_this_file_exercises_every_hookspec():
    specs = {name for name, obj in vars(hookspecs).items() if hasattr(obj, "maeframe_spec")}
    assert specs == EXERCISED_HOOKS


def test_every_registration_hook_from_a_plugin(write_plugin):
    write_plugin("mf_all_kinds", """
        from maeframe import hookimpl
        from maeframe_plugins.image import ImagePatchTokenizer
        from maeframe_plugins.image_data import FashionMNISTDataset
        from maeframe_plugins.losses import MaskedMSE
        from maeframe_plugins.masking import RandomMasker
        from maeframe_plugins.targets import PixelTarget
        from maeframe_plugins.weight_formats import OfficialMAEWeights
        from maeframe_plugins.tensorboard_logger import TensorBoardLogger

        class MyTokenizer(ImagePatchTokenizer): pass
        class MyMasker(RandomMasker): pass
        class MyTarget(PixelTarget): pass
        class MyLoss(MaskedMSE): pass
        class MyDataset(FashionMNISTDataset): pass
        class MyWeightFormat(OfficialMAEWeights): pass
        class MyLogger(TensorBoardLogger): pass

        @hookimpl
        def register_weight_formats(register): register("my_weight_format", MyWeightFormat)
        @hookimpl
        def register_tokenizers(register): register("my_tokenizer", MyTokenizer)
        @hookimpl
        def register_maskers(register): register("my_masker", MyMasker)
        @hookimpl
        def register_targets(register): register("my_target", MyTarget)
        @hookimpl
        def register_losses(register): register("my_loss", MyLoss)
        @hookimpl
        def register_datasets(register): register("my_dataset", MyDataset)
        @hookimpl
        def register_loggers(register): register("my_logger", MyLogger)
    """)
    registry = load_registry("mf_all_kinds")
    for kind, (_, base) in KINDS.items():
        entry = registry.get(kind, f"my_{kind}")
        assert entry.plugin == "mf_all_kinds" and issubclass(entry.cls, base)
    # the components are usable from a recipe under their new names
    prepared = prepare(QUICKSTART, ["plugins=[mf_all_kinds]", "tokenizer.name=my_tokenizer",
                                    "masker.name=my_masker", "target.name=my_target", "losses.0.name=my_loss",
                                    "data.train.name=my_dataset", "runtime.loggers=[my_logger]",
                                    "runtime.tensorboard=false"])
    assert type(prepared.components.masker).__name__ == "MyMasker"
    logger = prepared.provenance()["runtime.loggers.0"]
    assert (logger["name"], logger["plugin"]) == ("my_logger", "mf_all_kinds")


def test_validate_recipe_hook_rejects_with_a_field_path(write_plugin):
    write_plugin("mf_validator", """
        from maeframe import hookimpl

        @hookimpl
        def validate_recipe(recipe):
            if recipe.optim.epochs > 1:
                raise ValueError("optim.epochs: this plugin supports a single epoch")
            if recipe.seed == 13:
                raise ValueError("unlucky")
    """)
    with pytest.raises(RecipeError) as info:
        prepare(QUICKSTART, ["plugins=[mf_validator]"])
    assert info.value.problems == [("optim.epochs", "this plugin supports a single epoch")]
    assert "optim.epochs: this plugin supports a single epoch" in str(info.value)
    with pytest.raises(RecipeError) as info:  # no "path: " prefix -> the whole recipe
        prepare(QUICKSTART, ["plugins=[mf_validator]", "optim.epochs=1", "seed=13"])
    assert info.value.problems == [("recipe", "unlucky")]
    assert prepare(QUICKSTART, ["plugins=[mf_validator]", "optim.epochs=1"]).recipe.optim.epochs == 1


def test_lifecycle_hooks_in_order(write_plugin, tmp_path):
    from maeframe.engine.pretrain import Pretrainer

    write_plugin("mf_recorder", """
        from maeframe import hookimpl

        calls = []

        @hookimpl
        def validate_recipe(recipe):
            calls.append(("validate_recipe", recipe.name))

        @hookimpl
        def on_train_start(run):
            calls.append(("on_train_start", run.step, run.total_steps))

        @hookimpl
        def log_metrics(step, metrics):
            calls.append(("log_metrics", step, dict(metrics)))

        @hookimpl
        def on_epoch_end(run, epoch, metrics):
            calls.append(("on_epoch_end", epoch, run.step, dict(metrics)))

        @hookimpl
        def on_train_end(run, metrics):
            calls.append(("on_train_end", run.step, dict(metrics)))
    """)
    prepared = prepare(QUICKSTART, ["plugins=[mf_recorder]", *TINY, f"runtime.output_dir={tmp_path}"])
    trainer = Pretrainer(prepared)
    final = trainer.train()
    calls = sys.modules["mf_recorder"].calls
    assert [call[0] for call in calls] == ["validate_recipe", "on_train_start", "log_metrics", "on_epoch_end",
                                           "on_train_end"]
    assert calls[0] == ("validate_recipe", "quickstart")
    assert calls[1] == ("on_train_start", 0, 4)  # 64 images / 16 per step, one epoch
    _, step, logged = calls[2]
    assert step == 4 and math.isfinite(logged["loss"]) and logged["epoch"] == 1.0
    assert calls[3] == ("on_epoch_end", 1, 4, logged)
    assert calls[4] == ("on_train_end", 4, logged) and final == logged
    written = json.loads((tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["step"] == 4 and written["loss"] == logged["loss"]


def test_installed_plugin_that_fails_to_import_names_its_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "mf_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mf-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[maeframe]\nbroken = mf_broken_module\n")
    (tmp_path / "mf_broken_module.py").write_text("raise RuntimeError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin 'broken' \(mf-broken 0.1.*failed to import.*missing dependency"):
        make_plugin_manager()


STATE_PLUGIN = """
import torch
from maeframe import Masker, Mask, hookimpl

class Counting(Masker):
    '''random masking that counts its calls; state version {version}'''
    state_version = {version}
    calls = 0
    def __call__(self, batch_size, device):
        self.calls += 1
        noise = torch.rand(batch_size, self.spec.num_tokens, device=device)
        return Mask.from_noise(noise, self.spec.num_tokens // 4)
    def state_dict(self):
        return {state}
    def load_state_dict(self, state):
        self.calls = state["calls"]
{migrate}
class NoCall(Masker):
    '''forgot __call__'''

@hookimpl
def register_maskers(register):
    register("counting", Counting)
{extra}
"""


def write_state_plugin(folder, version, state, migrate="", extra=""):
    (folder / "counting_plugin.py").write_text(STATE_PLUGIN.format(version=version, state=state, migrate=migrate,
                                                                   extra=extra))
    for module in [m for m in sys.modules if m.startswith("counting_plugin")]:
        del sys.modules[module]


def test_component_state_is_versioned_migrated_or_refused_by_name(tmp_path, monkeypatch):
    """A plugin that changes its state's layout raises state_version and migrates old checkpoints; without
    a migration, or with a state that does not fit, the resume stops naming the recipe field and the class."""
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = tiny(tmp_path / "out", "plugins=[counting_plugin]", "masker={name: counting}", "runtime.max_steps=2")
    write_state_plugin(tmp_path, 1, '{"calls": self.calls}')
    Pretrainer(prepare(QUICKSTART, overrides)).train()
    saved = load_checkpoint(tmp_path / "out" / "quickstart" / "last.pt")["components"]["masker"]
    assert saved["version"] == 1 and saved["state"] == {"calls": 2} and saved["component"].endswith("Counting")
    more = [o for o in overrides if not o.startswith("runtime.max_steps")] + ["runtime.max_steps=3"]
    write_state_plugin(tmp_path, 2, '{"n": self.calls}')  # version 2 renamed the key, with no migration
    with pytest.raises(MaeframeError, match=r"masker \(counting_plugin.Counting\): .*state version 1.*reads version 2"):
        Pretrainer(prepare(QUICKSTART, more), resume=True)
    write_state_plugin(tmp_path, 1, '{"calls": self.calls}', extra="")  # same version, but the key is gone:
    state_path = tmp_path / "out" / "quickstart" / "last.pt"
    state = load_checkpoint(state_path)
    state["components"]["masker"]["state"] = {"count": 2}
    atomic_save(state, state_path)
    with pytest.raises(MaeframeError, match=r"masker \(counting_plugin.Counting\): the checkpoint's state does not fit.*KeyError"):
        Pretrainer(prepare(QUICKSTART, more), resume=True)
    migrate = "    def migrate_state(self, state, version):\n        return {'calls': state['count']}\n"
    write_state_plugin(tmp_path, 2, '{"calls": self.calls}', migrate=migrate)
    trainer = Pretrainer(prepare(QUICKSTART, more), resume=True)
    assert trainer.components.masker.calls == 2


def test_a_component_missing_a_required_method_is_refused_at_registration(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_state_plugin(tmp_path, 1, "{}", extra='    register("nocall", NoCall)')
    with pytest.raises(PluginError, match=r"plugin 'counting_plugin' registered masker 'nocall' as NoCall, which does "
                                          r"not implement __call__ of maeframe.Masker"):
        prepare(QUICKSTART, tiny(tmp_path, "plugins=[counting_plugin]"))


def test_a_plugin_adds_a_subcommand_through_register_commands(tmp_path, monkeypatch, capsys):
    """A distribution's `maeframe_commands` entry point adds `maeframe hello`; the built-in `pack` and
    `audio-stats` come the same way, and the core's CLI names no plugin module."""
    dist = tmp_path / "mf_hello-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mf-hello\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[maeframe_commands]\nhello = mf_hello_command\n")
    (tmp_path / "mf_hello_command.py").write_text(textwrap.dedent("""
        from maeframe import MaeframeError, hookimpl

        def hello(args):
            if args.name == "nobody":
                raise MaeframeError("hello: nobody to greet")
            print(f"hello {args.name}")
            return 0

        @hookimpl
        def register_commands(subparsers):
            parser = subparsers.add_parser("hello", help="greet someone")
            parser.add_argument("name")
            parser.set_defaults(func=hello)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from maeframe.cli import main

    assert main(["hello", "world"]) == 0 and capsys.readouterr().out == "hello world\n"
    assert main(["hello", "nobody"]) == 2 and capsys.readouterr().err == "error: hello: nobody to greet\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("hello", "pack", "audio-stats"))
    core = Path(conftest.ROOT / "maeframe" / "cli.py").read_text()
    assert "maeframe_plugins" not in core
    monkeypatch.setenv(BLOCK_ENV, "hello")
    with pytest.raises(SystemExit):
        main(["hello", "world"])  # blocked: no such subcommand


PLAIN_WEIGHTS = '''
import torch
from maeframe import EncoderLayout, WeightFormat, hookimpl

def ramp(num_tokens, width):
    return torch.linspace(0, 1, num_tokens * width).view(num_tokens, width)

class PlainWeights(WeightFormat):
    """torch.save({name: tensor}) of maeframe's encoder names, encoded without a cls token."""
    @property
    def layout(self):
        return EncoderLayout(cls_token=False, positions=ramp)
    def read(self, path, spec, model, tokenizer_options):
        return torch.load(path, weights_only=True)

@hookimpl
def register_weight_formats(register):
    register("plain", PlainWeights)
'''


def test_a_plugin_supplies_a_weight_format_for_init_format(tmp_path, monkeypatch):
    """A third-party `WeightFormat` (a plain torch.save dict of maeframe-named tensors, encoded without a cls
    token and with its own position table) is selected by `init.format` and read for fine-tuning; an unknown
    format is a field error listing the registered ones."""
    from maeframe.engine.finetune import FineTuner

    (tmp_path / "mf_plain_weights.py").write_text(PLAIN_WEIGHTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    pretrain = Pretrainer(prepare(QUICKSTART, tiny(tmp_path / "pre", "runtime.max_steps=1")))
    pretrain.train()
    weights = {k: v for k, v in pretrain.model.state_dict().items()
               if k.startswith("encoder.") and "cls_token" not in k and "pos_embed" not in k}
    torch.save(weights, tmp_path / "plain.pt")
    recipe = conftest.RECIPES / "finetune_fmnist.yaml"
    overrides = ["plugins=[mf_plain_weights]", "init.format=plain", f"init.checkpoint={tmp_path / 'plain.pt'}",
                 "model.embed_dim=32", "model.depth=1", "model.num_heads=2", f"runtime.output_dir={tmp_path}"]
    tuner = FineTuner(prepare(recipe, overrides))
    ours = tuner.model.state_dict()
    assert "encoder.cls_token" not in ours
    assert torch.equal(ours["encoder.blocks.0.mlp.fc1.weight"], weights["encoder.blocks.0.mlp.fc1.weight"])
    assert torch.equal(tuner.model.encoder.pos_embed[0, 1], torch.linspace(0, 1, 49 * 32).view(49, 32)[1])
    with pytest.raises(RecipeError, match=r"unknown weight_format 'plainer'.*plain"):
        prepare(recipe, [o.replace("=plain", "=plainer") for o in overrides])


def test_the_example_distributions_own_tests_pass_installed(example_site):
    """The example plugin's own test suite, run against the installed wheel as its author would in CI; it uses
    only maeframe's public API (`import maeframe`, `maeframe.recipe`, `maeframe.testing`)."""
    env = {key: value for key, value in os.environ.items() if key != BLOCK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(example_site), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          cwd=example_site, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    source = "\n".join(path.read_text() for path in (EXAMPLE / "tests").glob("*.py"))
    assert not re.search(r"from maeframe\.(build|plugins|registry|engine)", source)
