"""Failures as they happen on real clusters and real data: every user mistake is one `error:` report naming
the field, file or plugin, exit status 2, no traceback, nothing written; and nothing is skipped silently."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import timm
import torch
from PIL import Image

import maeframe
from maeframe.build import build_dataset, check_data, prepare
from maeframe.cli import main
from maeframe.engine.checkpoint import FORMAT, atomic_save, load_checkpoint
from maeframe.errors import RecipeError
from maeframe.model import MaskedAutoencoder
from maeframe.recipe import SEED_RANGE, load_recipe
from maeframe_plugins.audio_features import AUDIO_EXTENSIONS, SOUNDFILE_SUFFIXES
from conftest import QUICKSTART, RECIPES, ROOT, tiny

AUDIO = RECIPES / "audio_klettres.yaml"
VIDEO = RECIPES / "video_quickstart.yaml"
FINETUNE = RECIPES / "finetune_fmnist.yaml"


def problems(recipe, *overrides) -> dict[str, str]:
    """{field path: message} of the RecipeError that preparing the recipe raises."""
    with pytest.raises(RecipeError) as err:
        prepare(recipe, list(overrides))
    return dict(err.value.problems)


def validate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *named: str) -> None:
    """Exit 2, an `error:` report naming each of `named`, no traceback."""
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


# --- item 4: folder datasets take every decodable format and say what they pass over -------------------

def write_sound(path, rate: int = 16000, seconds: float = 0.3, **kwargs) -> None:
    t = np.arange(int(rate * seconds)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, **kwargs)


def test_audio_folder_reads_every_libsndfile_format_opus_included(tmp_path, caplog):
    """libsndfile here writes and reads Opus in Ogg; .opus (and mp3, aiff, ...) are taken by default, and what
    the folder passes over is logged with counts per reason."""
    assert "OPUS" in sf.available_subtypes("OGG"), "this libsndfile has no Opus: the .opus case cannot run"
    formats = {"a.wav": {}, "b.flac": {}, "c.ogg": {"format": "OGG", "subtype": "VORBIS"},
               "d.opus": {"format": "OGG", "subtype": "OPUS"}, "e.mp3": {}, "f.aiff": {}, "g.caf": {}}
    for cls in ("yes", "no"):
        (tmp_path / cls).mkdir()
        for name, kwargs in formats.items():
            write_sound(tmp_path / cls / name, **kwargs)
        (tmp_path / cls / "notes.txt").write_text("not a recording")
    (tmp_path / "README.md").write_text("loose file, in no class folder")
    caplog.set_level(logging.INFO, logger="maeframe.data")
    prepared = prepare(AUDIO, [f"data.train={{name: audio_folder, options: {{root: {tmp_path}}}}}"])
    dataset = build_dataset(prepared, "train")
    assert len(dataset) == 2 * len(formats) and dataset.skipped == []
    assert {path.suffix for path, _ in dataset.items} == {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".caf"}
    assert dataset[[p.suffix for p, _ in dataset.items].index(".opus")][0].shape == (1, 128, 128)
    [record] = [r for r in caplog.records if r.name == "maeframe.data"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"audio_folder: passed over 3 files under {tmp_path}: 2 with extension "
                                          f".txt, 1 directly under the root, outside any class folder")


def test_default_audio_extensions_cover_the_decoders_formats():
    """Every format soundfile.available_formats() lists is taken by suffix, except those documented as left
    out (RAW has no header; .mat and .mpc usually hold something else)."""
    left_out = {"RAW", "MAT4", "MAT5", "MPC2K"}
    assert set(sf.available_formats()) - set(SOUNDFILE_SUFFIXES) <= left_out
    for name in set(sf.available_formats()) - left_out:
        assert set(SOUNDFILE_SUFFIXES[name]) <= set(AUDIO_EXTENSIONS), name
    assert ".opus" in AUDIO_EXTENSIONS


def test_audio_folder_pattern_and_classes_exclusions_are_info(tmp_path, caplog):
    for cls in ("a", "b"):
        (tmp_path / cls / "alpha").mkdir(parents=True)
        (tmp_path / cls / "syllab").mkdir()
        write_sound(tmp_path / cls / "alpha" / "x.wav")
        write_sound(tmp_path / cls / "syllab" / "y.wav")
    caplog.set_level(logging.INFO, logger="maeframe.data")
    tree = f"{{name: audio_folder, options: {{root: {tmp_path}, pattern: 'alpha/*', classes: [a]}}}}"
    dataset = build_dataset(prepare(AUDIO, [f"data.train={tree}"]), "train")
    assert [p.name for p, _ in dataset.items] == ["x.wav"]
    [record] = [r for r in caplog.records if r.name == "maeframe.data"]
    assert record.levelno == logging.INFO
    assert "passed over 3 files" in record.getMessage() and "2 outside the pattern 'alpha/*'" in record.getMessage()
    assert "1 in class folders not listed in `classes`" in record.getMessage()


def test_image_folder_logs_what_it_passes_over(tmp_path, caplog):
    for cls in ("shirt", "shoe"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((28, 28), 128, np.uint8)).save(tmp_path / cls / "a.png")
        (tmp_path / cls / "b.heic").write_bytes(b"\0\0\0\x18ftypheic")  # a format torchvision/PIL do not read
    (tmp_path / "shoe" / "labels.csv").write_text("a,1\n")
    caplog.set_level(logging.INFO, logger="maeframe.data")
    tree = f"{{name: image_folder, options: {{root: {tmp_path}, mean: [0.5], std: [0.5]}}}}"
    dataset = build_dataset(prepare(QUICKSTART, [f"data.train={tree}"]), "train")
    assert len(dataset) == 2
    [record] = [r for r in caplog.records if r.name == "maeframe.data"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"image_folder: passed over 3 files under {tmp_path}: 2 with extension "
                                          f".heic, 1 with extension .csv (taken: .jpg, .jpeg, .png")


# --- item 7: mask ratios that leave no hidden or no visible token ------------------------------------------

@pytest.mark.parametrize("recipe,overrides,field", [
    (QUICKSTART, ["masker.options.ratio=0.0"], "masker.options.ratio"),                   # 7×7: nothing hidden
    (QUICKSTART, ["masker.options.ratio=0.99"], "masker.options.ratio"),                  # int(49 × 0.01) = 0 kept
    (QUICKSTART, ["masker={name: block, options: {ratio: 0.0}}"], "masker.options.ratio"),
    (QUICKSTART, ["masker={name: block, options: {ratio: 0.99}}"], "masker.options.ratio"),
    (VIDEO, ["masker.options.ratio=0.0"], "masker.options.ratio"),                        # tube
    (VIDEO, ["masker.options.ratio=0.99"], "masker.options.ratio"),
    (AUDIO, ["masker={name: time_freq, options: {time_ratio: 0.1, freq_ratio: 0.1}}"],  # 8×8: int(0.8) = 0 each
     "masker.options.time_ratio"),
    (QUICKSTART, ["masker={name: curriculum, options: {start: 0.0, end: 0.75}}"], "masker.options.start"),
    (QUICKSTART, ["masker={name: curriculum, options: {start: 0.5, end: 0.99, strategies: [{name: block}]}}"],
     "masker.options.end"),
], ids=["random-0", "random-0.99", "block-0", "block-0.99", "tube-0", "tube-0.99", "time_freq", "curriculum-start",
        "curriculum-end"])
def test_mask_ratios_without_hidden_or_visible_tokens_are_refused(recipe, overrides, field, capsys):
    found = problems(recipe, *overrides)
    assert list(found) == [field], found
    assert "grid (" in found[field]
    args = [arg for override in overrides for arg in ("--set", override)]
    code, _, err = validate(capsys, recipe, *args)
    assert_user_error(code, err, field)


def test_running_cell_always_leaves_hidden_and_visible_tokens():
    """running_cell hides 1, 2 or 3 of every 4 positions (ratio 0.25, 0.5 or 0.75, never 0): nothing to refuse."""
    for ratio in (0.25, 0.5, 0.75):
        masker = prepare(VIDEO, [f"masker={{name: running_cell, options: {{ratio: {ratio}}}}}"]).components.masker
        assert 0 < masker.visible_tokens() < masker.spec.num_tokens


def test_a_plugin_constructor_can_name_its_option(tmp_path, monkeypatch):
    """`maeframe.OptionError(field, message)` from a constructor is reported at `<component>.options.<field>`."""
    (tmp_path / "strict_target.py").write_text(
        "from maeframe import OptionError, hookimpl\n"
        "from maeframe_plugins.targets import PixelTarget\n"
        "class Strict(PixelTarget):\n"
        "    def __init__(self, options, tokenizer):\n"
        "        raise OptionError('norm_pix', 'this target needs norm_pix: false')\n"
        "@hookimpl\n"
        "def register_targets(register):\n"
        "    register('strict_pixel', Strict)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = problems(QUICKSTART, "plugins=[strict_target]", "target.name=strict_pixel")
    assert found == {"target.options.norm_pix": "this target needs norm_pix: false"}


# --- item 9: duplicate keys ---------------------------------------------------------------------------------

def with_lines(text: str, after: str, *lines: str) -> str:
    """`text` with `lines` inserted after the first line starting with `after`."""
    rows = text.splitlines()
    at = next(i for i, row in enumerate(rows) if row.startswith(after)) + 1
    return "\n".join([*rows[:at], *lines, *rows[at:]]) + "\n"


def line_of(text: str, start: str, nth: int = 0) -> int:
    return [i + 1 for i, row in enumerate(text.splitlines()) if row.startswith(start)][nth]


def test_a_second_block_with_the_same_key_is_refused(tmp_path, capsys):
    """A second `optim:` would replace the first whole (its lr, epochs, ...) without a word."""
    text = QUICKSTART.read_text() + "optim:\n  epochs: 1\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    found = problems(path)
    assert list(found) == ["optim"]
    assert f"line {line_of(text, 'optim:')} and line {line_of(text, 'optim:', 1)}" in found["optim"]
    code, _, err = validate(capsys, path)
    assert_user_error(code, err, "twice.yaml", "optim", "appears twice")
    with pytest.raises(RecipeError):  # run refuses it the same way: nothing is created
        load_recipe(path)


@pytest.mark.parametrize("after,line,field,offsets", [
    ("      split: train", "      split: test", "data.train.options.split", (0, 1)),  # three levels down
    ("  - name: mse", "    weight: 2.0", "losses.0.weight", (1, 2)),                 # inside a list item
    ("  lr: 2.0e-3", "  lr: 1.0", "optim.lr", (0, 1)),
])
def test_duplicate_keys_are_refused_at_any_depth(tmp_path, after, line, field, offsets):
    """`line` is inserted after the line `after`; the two keys sit at these offsets from `after`."""
    text = with_lines(QUICKSTART.read_text(), after, line)
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    found = problems(path)
    assert list(found) == [field]
    first, second = (line_of(text, after) + offset for offset in offsets)
    assert f"at line {first} and line {second}" in found[field], found


def test_merge_keys_still_override(tmp_path):
    """`<<: *anchor` followed by a key of its own is YAML's override, not a duplicate."""
    text = QUICKSTART.read_text().replace("  train:\n    name: fashion_mnist", "  train: &train\n    name: fashion_mnist")
    text = with_lines(text, "  batch_size:", "  eval:", "    <<: *train", "    options: {split: test}")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.data.eval.name == "fashion_mnist" and recipe.data.eval.options == {"split": "test"}


# --- item 10: the rest of the everyday mistakes -------------------------------------------------------------

def test_recipes_that_are_not_utf8_are_reported_and_the_next_is_checked(tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, checkpoint)  # a checkpoint passed by mistake
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(QUICKSTART.read_bytes().replace(b"# Quickstart", "# Quickstart (café)".encode("latin-1")))
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(bytes(range(256)) * 4)
    code, out, err = validate(capsys, checkpoint, latin, noise, QUICKSTART)
    assert_user_error(code, err, f"{checkpoint}: invalid recipe", "a binary file", f"{latin}: invalid recipe",
                      "not UTF-8 text: byte 0xe9 at line 1", f"{noise}: invalid recipe")
    assert err.count("error: ") == 3
    assert f"{QUICKSTART}: ok" in out


@pytest.mark.parametrize("seed", [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1])
def test_seeds_torch_refuses_are_refused_at_validation(seed, capsys):
    for low_or_high in SEED_RANGE:  # the bounds themselves are torch's
        torch.Generator().manual_seed(low_or_high)
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(seed)
    assert "seed" in problems(QUICKSTART, f"seed={seed}")
    assert "seed" in problems(FINETUNE, f"seed={seed}")  # downstream recipes too
    code, _, err = validate(capsys, QUICKSTART, "--set", f"seed={seed}")
    assert_user_error(code, err, "seed")
    assert prepare(QUICKSTART, [f"seed={SEED_RANGE[1]}"]).recipe.seed == SEED_RANGE[1]


def test_validate_data_accepts_a_good_recipe_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert check_data(prepare(QUICKSTART, tiny(out_dir))) == []
    code, out, err = validate(capsys, QUICKSTART, "--data", *[a for o in tiny(out_dir) for a in ("--set", o)])
    assert code == 0, err
    assert "data, device and output directory checked" in out
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_a_field_error(tmp_path, capsys):
    sets = [a for o in tiny(tmp_path / "out", "runtime.device=cuda") for a in ("--set", o)]
    code, _, err = validate(capsys, QUICKSTART, "--data", *sets)
    assert_user_error(code, err, "runtime.device", "no CUDA device")
    assert validate(capsys, QUICKSTART, *sets)[0] == 0  # without --data: the recipe alone is fine


def test_output_dir_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "runs"
    existing.write_text("a file where the runs should go")
    sets = [a for o in tiny(existing) for a in ("--set", o)]
    code, _, err = validate(capsys, QUICKSTART, "--data", *sets)
    assert_user_error(code, err, "runtime.output_dir", f"{existing} exists and is a file")
    assert existing.read_text() == "a file where the runs should go"


@pytest.mark.parametrize("extra,message", [
    (["data.train.options.limit=10"], "data.batch_size 16 × optim.accum_steps 1 = 16 samples, but data.train "
                                      "(fashion_mnist) holds 10"),
    (["data.train.options.limit=20", "optim.accum_steps=2"], "× optim.accum_steps 2 = 32 samples"),
])
def test_a_batch_larger_than_the_dataset(tmp_path, capsys, extra, message):
    sets = [a for o in tiny(tmp_path / "out", *extra) for a in ("--set", o)]
    code, _, err = validate(capsys, QUICKSTART, "--data", *sets)
    assert_user_error(code, err, "data.batch_size", message)


@pytest.mark.parametrize("tree", [
    "{name: fashion_mnist, options: {root: MISSING}}",
    "{name: image_folder, options: {root: MISSING, mean: [0.5], std: [0.5]}}",
    "{name: packed, options: {path: MISSING, mean: [0.5], std: [0.5]}}",
])
def test_a_dataset_root_that_does_not_exist(tmp_path, capsys, tree):
    missing = tmp_path / "no" / "such" / "folder"
    sets = [a for o in tiny(tmp_path / "out", f"data.train={tree.replace('MISSING', str(missing))}")
            for a in ("--set", o)]
    assert validate(capsys, QUICKSTART, *sets)[0] == 0  # reading data needs --data
    code, _, err = validate(capsys, QUICKSTART, "--data", *sets)
    field = "data.train.options.path" if "packed" in tree else "data.train.options.root"
    assert_user_error(code, err, field, str(missing))
    assert not (tmp_path / "out").exists()


# --- item 11: the timm call printed by export works for any encoder ----------------------------------------

def test_export_prints_a_timm_call_that_builds_the_tiny_encoder(tmp_path, capsys):
    """The tiny quickstart encoder (28², patches of 4, 1 channel, width 32, depth 1, 2 heads) exported under a
    standard timm name: the printed `timm.create_model(...)` runs as printed and gives the encoder's features."""
    overrides = tiny(tmp_path / "runs", "optim.epochs=1", "runtime.max_steps=1")
    assert main(["run", str(QUICKSTART), *overrides]) == 0
    checkpoint = tmp_path / "runs" / "quickstart" / "last.pt"
    capsys.readouterr()
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(checkpoint), str(out), "--timm-name", "vit_tiny_patch16_224"]) == 0
    call = capsys.readouterr().out.strip().splitlines()[-1]
    for argument in ("img_size=28", "patch_size=4", "in_chans=1", "embed_dim=32", "depth=1", "num_heads=2"):
        assert argument in call, call
    vit = eval(call, {"timm": timm}).eval()  # exactly what the user copies

    prepared = prepare(QUICKSTART, overrides)
    model = MaskedAutoencoder(prepared.components.tokenizer.spec, prepared.components.target.out_dim,
                              prepared.recipe.model)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    dataset = build_dataset(prepared, "eval")
    images = torch.stack([dataset[i][0] for i in range(4)])  # real Fashion-MNIST images
    with torch.no_grad():
        ours = model.eval().encoder(prepared.components.tokenizer.tokenize(images).patches, ids_keep=None)
        torch.testing.assert_close(vit.forward_features(images), ours, atol=1e-5, rtol=0)


def test_export_refuses_a_timm_model_that_cannot_hold_the_encoder(tmp_path, capsys):
    prepared = prepare(QUICKSTART, tiny(tmp_path))
    model = MaskedAutoencoder(prepared.components.tokenizer.spec, prepared.components.target.out_dim,
                              prepared.recipe.model)
    atomic_save({"format": FORMAT, "step": 0, "model": model.state_dict(),
                 "recipe": prepared.recipe.model_dump(mode="json")}, tmp_path / "last.pt")
    code = main(["export", str(tmp_path / "last.pt"), str(tmp_path / "x.safetensors"), "--timm-name", "resnet18"])
    err = capsys.readouterr().err
    assert_user_error(code, err, "resnet18", "not a VisionTransformer")
    assert not (tmp_path / "x.safetensors").exists()


# --- item 12: plurals, and a CLI that parses --help without torch ------------------------------------------

def test_unknown_loss_lists_registered_losses():
    found = problems(QUICKSTART, "losses.0.name=msee")
    assert "registered losses: " in found["losses.0.name"] and "losss" not in found["losses.0.name"]


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"]])
def test_help_imports_no_torch(argv):
    code = ("import sys\nfrom maeframe.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)" % (argv,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "usage: maeframe" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_the_public_names_still_resolve():
    assert set(maeframe.__all__) <= set(dir(maeframe))
    for name in maeframe.__all__:
        assert getattr(maeframe, name) is not None, name
    from maeframe import Masker, TokenSpec, hookimpl  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'Maskr'"):
        maeframe.Maskr  # noqa: B018


@pytest.mark.parametrize("override, field", [
    ("runtime.device=cuda", "runtime.device"),
    ("data.batch_size=65", "data.batch_size"),
    ("OUTPUT_IS_A_FILE", "runtime.output_dir"),
])
def test_run_refuses_what_validate_data_finds(tmp_path, capsys, override, field):
    """`maeframe run` stops with an error line naming the field (exit 2), not a traceback, and writes nothing."""
    if field == "runtime.device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if override == "OUTPUT_IS_A_FILE":
        (tmp_path / "taken").write_text("a file")
        override = f"runtime.output_dir={tmp_path / 'taken'}"
    code = main(["run", str(QUICKSTART), *tiny(tmp_path / "out"), override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and field in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "quickstart").exists()
