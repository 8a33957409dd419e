"""`maeframe new-plugin NAME`: write a plugin distribution from the template in maeframe/templates/plugin/.

Template files end in `.tmpl`; `{{name}}` (plugin name), `{{module}}` (import name), `{{distribution}}`,
`{{Class}}` (class-name prefix) and `{{maeframe_version}}` are replaced in their text, and a `__module__`
folder is renamed to the module. Imports neither torch nor the engine.
"""
from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from . import __version__

TEMPLATE = "templates/plugin"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def template_names(name: str) -> dict[str, str]:
    """'my-lab' -> {name: my_lab, module: maeframe_my_lab, distribution: maeframe-my-lab, Class: MyLab, ...}."""
    name = name.strip().lower().replace("-", "_")
    for prefix in ("maeframe_", "maeframe"):
        if name.startswith(prefix) and name != prefix:
            name = name[len(prefix):]
            break
    if not _NAME.match(name):
        raise ValueError(f"plugin name {name!r} must start with a letter and hold only lower-case letters, digits, "
                         f"_ and - (e.g. mylab)")
    return {"name": name, "module": f"maeframe_{name}", "distribution": f"maeframe-{name.replace('_', '-')}",
            "Class": "".join(part.capitalize() for part in name.split("_") if part),
            "maeframe_version": __version__}


def render(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def write_plugin(name: str, directory: str | Path = ".") -> tuple[Path, dict[str, str]]:
    """Write `directory`/maeframe-<name>/ from the template; returns (that folder, the names used).
    Refuses to write into an existing folder."""
    names = template_names(name)
    root = Path(directory) / names["distribution"]
    if root.exists():
        raise ValueError(f"{root} already exists; choose another name or --dir")
    template = files("maeframe").joinpath(TEMPLATE)
    for source, relative in _walk(template, ()):
        target = root.joinpath(*(names["module"] if part == "__module__" else part for part in relative))
        target = target.with_name(target.name.removesuffix(".tmpl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(source.read_text(encoding="utf-8"), names), encoding="utf-8")
    return root, names


def _walk(folder, relative: tuple[str, ...]):
    """(file, path parts below the template) for every template file, sorted."""
    for item in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if item.is_dir():
            if item.name != "__pycache__":
                yield from _walk(item, (*relative, item.name))
        elif item.name.endswith(".tmpl"):
            yield item, (*relative, item.name)
