"""Fuzzing the recipe loader: no input may fail with anything but a validation error naming a field."""
import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maeframe.build import prepare
from maeframe.errors import MaeframeError, RecipeError
from maeframe.recipe import parse_recipe
from maeframe.recipe_file import read_recipe_tree
from conftest import QUICKSTART

BASE = yaml.safe_load(QUICKSTART.read_text())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)


def paths(tree, prefix=()):
    """Every key path of a nested dict/list (except `plugins`: importing arbitrary modules is not fuzzed)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        if key == "plugins":
            continue
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


ALL_PATHS = list(paths(BASE))


@FUZZ
@given(st.text(max_size=200))
def test_any_text_is_valid_yaml_or_a_recipe_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(text)
    try:
        parse_recipe(read_recipe_tree(path))
    except RecipeError:
        pass


@FUZZ
@given(trees)
def test_any_tree_is_a_recipe_error(tree):
    try:
        parse_recipe(tree)
    except RecipeError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), trees, st.booleans()), min_size=1, max_size=3))
def test_mutated_recipes_validate_or_fail_with_field_paths(mutations):
    tree = copy.deepcopy(BASE)
    for path, value, delete in mutations:
        node = tree
        try:
            for key in path[:-1]:
                node = node[key]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    try:
        prepare(parse_recipe(tree))
    except RecipeError as err:
        assert err.problems and all(path for path, _ in err.problems)
    except MaeframeError:
        pass
