"""The base every plugin-supplied component derives from: declared options and resumable state."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base of each component's options; unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component:
    """A named building block a recipe selects, e.g. a masker or a target.

    Subclasses declare `Options` (a pydantic model with a description on every field). Components with
    state that must survive a resume (a schedule's position, an EMA teacher) override `state_dict` and
    `load_state_dict`; the engine saves them in every checkpoint. Components that follow training
    override `attach` (called once with the model) and `set_progress` (called on the host before every
    optimizer step, never with a device sync).
    """

    Options: ClassVar[type[Options]] = Options
    kind: ClassVar[str] = "component"

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
