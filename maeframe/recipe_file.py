"""A recipe file -> a plain tree: UTF-8 text checked for binary content, YAML read with a loader that refuses
repeated keys, and dotted `key=value` overrides applied. The schema is `maeframe.recipe`'s."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus '1e-3'-style numbers that YAML 1.1 would leave as strings."""
    value = yaml.safe_load(raw)
    return float(value) if isinstance(value, str) and _NUMBER.match(value) else value


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply 'a.b.c=value' to a nested dict; value is parsed as YAML ('1e-3' -> float, 'null' -> None)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError([(assignment, "override must look like dotted.key=value")], "command line")
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError([(key, f"{'.'.join(parts[:i]) or 'recipe'} is a list of {len(node)}; "
                                         f"{part!r} is not an index in it")], "command line")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and node.get(part) is None:  # absent or null (e.g. `ema: null`): start a mapping
                node[part] = {}
        else:
            raise RecipeError([(key, f"{'.'.join(parts[:i])} is not a mapping")], "command line")
        if last:
            node[index] = parse_value(raw)
        else:
            node = node[index]


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping; `field` is its dotted path in the recipe."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping, at any depth: plain YAML keeps the last
    value, so a second `optim:` block would silently replace the first one whole. Merge keys (`<<: *base`)
    still override as YAML defines."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, (), set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, (*path, str(i)), seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = self._scalar_key(key_node)
                line = key_node.start_mark.line + 1
                if key is not None and key in first:
                    raise DuplicateKeyError(".".join((*path, str(key))),
                                            f"key {key!r} appears twice in one mapping, at line {first[key]} and "
                                            f"line {line}; YAML would silently keep only the second value (the "
                                            f"whole block); remove or merge one of them")
                if key is not None:
                    first[key] = line
                self._check_keys(value_node, (*path, str(key)), seen)

    def _scalar_key(self, node: yaml.Node) -> Any:
        """The key's value, or None for merge keys and non-scalar keys (which YAML itself handles)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:merge":
            return None
        try:
            return self.construct_object(node)
        except Exception:  # a malformed tagged scalar: constructing the document reports it
            return None


_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")  # never in YAML text (tab, newlines, ESC are)


def read_recipe_text(path: Path) -> str:
    """The file as UTF-8 text; a RecipeError naming the file for binary files (e.g. a checkpoint passed by
    mistake), other encodings (the line and byte that are not UTF-8) and unreadable files."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError([("recipe", f"cannot read the file: {err.strerror or err}")], str(path)) from err
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError([("recipe", "UTF-16 text; save the recipe as UTF-8")], str(path))
    if _CONTROL_BYTES.search(data[:8192]):
        raise RecipeError([("recipe", "a binary file, not a YAML recipe (a checkpoint or weights file passed "
                                      "by mistake?)")], str(path))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecipeError([("recipe", f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, column "
                                      f"{column}; save the recipe as UTF-8 (e.g. iconv -f latin1 -t utf-8)")],
                          str(path)) from None


def read_recipe_tree(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe file as a tree of plain values with `overrides` applied; RecipeError for anything that is not
    a UTF-8 YAML mapping without repeated keys."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([("recipe", f"file not found: {path}")], str(path))
    text = read_recipe_text(path)
    try:
        tree = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 -- a SafeLoader: constructs no objects
    except DuplicateKeyError as err:
        raise RecipeError([(err.field, err.message)], str(path)) from None
    except yaml.YAMLError as err:
        raise RecipeError([("recipe", f"not valid YAML: {err}")], str(path)) from err
    if not isinstance(tree, dict):
        raise RecipeError([("recipe", f"top level must be a mapping, got {type(tree).__name__}")], str(path))
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted field path: leaf value} of a nested recipe dict (lists of mappings by index, e.g. losses.0.name)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_tree(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(tree, list) and any(isinstance(item, (dict, list)) for item in tree):
        out = {}
        for i, item in enumerate(tree):
            out.update(flatten_tree(item, f"{prefix}.{i}"))
        return out or {prefix: []}
    return {prefix: tree}
