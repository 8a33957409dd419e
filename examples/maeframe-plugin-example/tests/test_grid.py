"""Tests for the `grid` masker, as a plugin author would write them.

A masker is a plain object: build it from its Options and a TokenSpec, call it, and check the Mask. No
data, model or training run is needed. Run with `pytest` from this folder (pyproject.toml puts src/ on
the path) or after `pip install -e .`.
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from maeframe import Mask, Masker, RecipeError, TokenSpec, prepare
from maeframe.recipe import parse_recipe
from maeframe.testing import load_registry
from maeframe_plugin_example import GridMasker, GridOptions

INSTALLED = bool(importlib.metadata.entry_points(group="maeframe", name="example"))
# Installed: maeframe finds the plugin through its entry point. Not installed: load it by module name,
# as a recipe's `plugins:` list would.
EXTRA = [] if INSTALLED else ["maeframe_plugin_example"]


def spec(*grid: int) -> TokenSpec:
    return TokenSpec(grid=grid, patch_size=(16,) * len(grid), channels=3)


def check_mask_contract(mask: Mask, batch: int, num_tokens: int) -> None:
    """What every maeframe masker must produce: static shapes and consistent index tensors."""
    visible = mask.num_visible
    assert mask.ids_keep.shape == (batch, visible) and mask.ids_keep.dtype == torch.long
    assert mask.ids_restore.shape == (batch, num_tokens) and mask.ids_restore.dtype == torch.long
    assert mask.masked.shape == (batch, num_tokens) and mask.masked.dtype == torch.float32
    # ids_restore is a permutation, and the kept tokens sit at positions 0..V-1 of the shuffled order
    assert torch.equal(mask.ids_restore.sort(dim=1).values, torch.arange(num_tokens).expand(batch, -1))
    assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), torch.arange(visible).expand(batch, -1))
    # `masked` is 0 exactly at the kept tokens, and every sample hides the same number
    assert torch.equal(mask.masked.gather(1, mask.ids_keep), torch.zeros(batch, visible))
    assert torch.equal(mask.masked.sum(1), torch.full((batch,), float(num_tokens - visible)))


def test_keeps_top_left_of_every_cell():
    mask = GridMasker(GridOptions(), spec(4, 4))(batch_size=3, device=torch.device("cpu"))
    check_mask_contract(mask, 3, 16)
    assert mask.ids_keep.tolist() == [[0, 2, 8, 10]] * 3
    expected = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(mask.masked.view(3, 4, 4), expected.expand(3, 4, 4))


def test_same_mask_as_an_explicit_boolean_mask():
    grid = (6, 9)
    mask = GridMasker(GridOptions(stride=3), spec(*grid))(2, torch.device("cpu"))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    hidden = ~((rows % 3 == 0) & (cols % 3 == 0)).flatten().expand(2, -1)
    reference = Mask.from_bool(hidden)
    assert torch.equal(mask.ids_keep, reference.ids_keep)
    assert torch.equal(mask.ids_restore, reference.ids_restore)
    assert torch.equal(mask.masked, reference.masked)


def test_random_offset_shifts_the_lattice_per_sample():
    torch.manual_seed(0)
    mask = GridMasker(GridOptions(random_offset=True), spec(8, 6))(64, torch.device("cpu"))
    check_mask_contract(mask, 64, 48)
    rows, cols = mask.ids_keep // 6, mask.ids_keep % 6
    # one offset per sample, shared by all its cells ...
    assert torch.equal(rows % 2, (rows[:, :1] % 2).expand_as(rows))
    assert torch.equal(cols % 2, (cols[:, :1] % 2).expand_as(cols))
    # ... and all four offsets occur
    assert len({(int(r), int(c)) for r, c in zip(rows[:, 0] % 2, cols[:, 0] % 2)}) == 4


@pytest.mark.parametrize(("grid", "stride", "message"), [
    ((4, 4, 4), 2, "2-D"),
    ((7, 7), 2, "not divisible"),
    ((6, 4), 3, "not divisible"),
])
def test_rejects_unsuitable_grids(grid, stride, message):
    with pytest.raises(ValueError, match=message):
        GridMasker(GridOptions(stride=stride), spec(*grid))


def test_options_are_validated():
    with pytest.raises(ValueError):
        GridOptions(stride=1)  # would hide nothing
    with pytest.raises(ValueError):
        GridOptions(ratio=0.75)  # unknown keys are errors
    assert all(field.description for field in GridOptions.model_fields.values())


def test_registered_through_maeframe():
    registry = load_registry(EXTRA)
    entry = registry.get("masker", "grid")
    assert entry.cls is GridMasker and issubclass(entry.cls, Masker)
    assert entry.plugin == ("example" if INSTALLED else "maeframe_plugin_example")


def recipe(**masker_options):
    return parse_recipe({
        "name": "grid-test", "plugins": EXTRA,
        "tokenizer": {"name": "image_patch", "options": {"image_size": 28, "patch_size": 4, "channels": 1}},
        "masker": {"name": "grid", "options": masker_options},
        "target": {"name": "pixel"}, "losses": [{"name": "mse"}],
        "data": {"train": {"name": "fashion_mnist"}, "batch_size": 8}, "optim": {"epochs": 1},
    })


def test_recipe_errors_name_the_masker_field():
    # 28 / 4 = 7 tokens a side: not divisible by 2. `prepare` checks without touching data.
    with pytest.raises(RecipeError) as info:
        prepare(recipe())
    assert info.value.problems[0][0] == "masker"
    with pytest.raises(RecipeError) as info:
        prepare(recipe(stride=0))
    assert info.value.problems[0][0] == "masker.options.stride"
    assert prepare(recipe(stride=7)).components.masker.spec.grid == (7, 7)
