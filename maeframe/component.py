"""The base every plugin-supplied component derives from: declared options and resumable state."""
from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base of each component's options; unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component(ABC):
    """A named building block a recipe selects, e.g. a masker or a target.

    Subclasses declare `Options` (a pydantic model with a description on every field). Components with
    state that must survive a resume (a schedule's position, an EMA teacher) override `state_dict` and
    `load_state_dict`; the engine saves them in every checkpoint with `state_version`, and a plugin that
    changes its state's layout raises the version and reads older states in `migrate_state`. Components
    that follow training override `attach` (called once with the model) and `set_progress` (called on the
    host before every optimizer step, never with a device sync). A class that leaves an abstract method of
    its base unimplemented is refused when its plugin registers it.
    """

    Options: ClassVar[type[Options]] = Options
    kind: ClassVar[str] = "component"
    state_version: ClassVar[int] = 1  # raise it when `state_dict`'s layout changes; see `migrate_state`

    def __init__(self, options: Options):
        self.options = options

    def attach(self, model: Any) -> None:
        """Called once by the engine with the `MaskedAutoencoder` (e.g. to copy an EMA teacher)."""

    def set_progress(self, step: int, epoch: float) -> None:
        """Called before each optimizer step with the step index and the fractional epoch."""

    def metrics(self) -> dict[str, float]:
        """Values to log at each logging interval, e.g. a schedule's current mask ratio. Keys are
        prefixed with the component's kind in metrics.jsonl ("masker/ratio")."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")

    def migrate_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        """`state` as saved by `state_version` `version` (an older or newer plugin) -> this version's layout.
        The default knows no other version: a checkpoint of another state version is refused."""
        raise ValueError(f"the checkpoint holds state version {version}, {type(self).__name__} reads version "
                         f"{self.state_version} and defines no migrate_state for it")

    def versioned_state(self) -> dict[str, Any]:
        """What the engine saves: {"component", "version", "state"}."""
        return {"component": f"{type(self).__module__}.{type(self).__qualname__}", "version": self.state_version,
                "state": self.state_dict()}

    def load_versioned_state(self, saved: dict[str, Any], field: str) -> None:
        """Restore what `versioned_state` saved (or a bare state dict of checkpoints before versions), migrating
        another version; any mismatch is an error naming the recipe field and the component, not a KeyError
        from inside it."""
        from .errors import MaeframeError

        versioned = isinstance(saved, dict) and {"component", "version", "state"} <= set(saved)
        version, state = (saved["version"], saved["state"]) if versioned else (1, saved)
        name = f"{field} ({type(self).__module__}.{type(self).__qualname__})"
        try:
            if version != self.state_version:
                state = self.migrate_state(state, version)
            self.load_state_dict(state)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            saved_by = f", saved by {saved['component']}" if versioned else ""
            raise MaeframeError(f"{name}: the checkpoint's state does not fit this component{saved_by}: "
                                f"{type(err).__name__}: {err}") from None
