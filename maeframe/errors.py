"""Errors a user can act on. Each message names what is wrong: a recipe field path, a file, a plugin."""


class MaeframeError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class RecipeError(MaeframeError):
    """A recipe is invalid. `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "recipe"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: invalid recipe"] + [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class PluginError(MaeframeError):
    """A plugin failed to load or register, or a component name is unknown or duplicated."""


class OptionError(ValueError):
    """A component's constructor rejects one of its options for this recipe (e.g. a mask ratio that hides no
    token of this grid). Reported at `<component field>.options.<field>`, e.g. `masker.options.ratio`."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")
