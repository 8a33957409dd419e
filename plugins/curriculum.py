"""Curriculum masking: a schedule of mask ratio and strategy mixing around other maskers."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from maeframe import Mask, Masker, OptionError, Options, PluginError, TokenSpec, build_component, hookimpl


class StrategyOptions(Options):
    name: str = Field(description="registered masker name, e.g. random, block, tube; it must have a `ratio` option")
    options: dict[str, Any] = Field(default_factory=dict, description="that masker's options, without `ratio` "
                                                                      "(the curriculum sets it every step)")


class CurriculumOptions(Options):
    strategies: list[StrategyOptions] = Field(
        default_factory=lambda: [{"name": "random"}], validate_default=True, min_length=1,
        description="maskers to schedule, each {name, options}; every one gets the scheduled ratio")
    start: float = Field(0.75, ge=0, lt=1, description="mask ratio at the start of the schedule")
    end: float = Field(0.75, ge=0, lt=1, description="mask ratio at the end of the span and after it")
    span: float = Field(1.0, gt=0, description="length of the schedule from start to end, in `unit`s")
    unit: Literal["epoch", "step"] = Field("epoch", description="what span counts: fractional epochs or "
                                                                "optimizer steps")
    shape: Literal["constant", "linear", "cosine", "step"] = Field(
        "linear", description="constant (start throughout), linear, cosine (half-cosine ease from start to end) "
                              "or step (`steps` equal plateaus from start to end)")
    steps: int = Field(4, ge=2, description="plateaus of the step shape, evenly spaced from start (first) to end "
                                            "(last) over the span")
    probs_start: list[float] | None = Field(None, description="probability of each strategy at the start (sums "
                                                              "to 1); None = probs_end, or only the first strategy")
    probs_end: list[float] | None = Field(None, description="probability of each strategy at the end, interpolated "
                                                            "with the same shape; None = probs_start")

    @model_validator(mode="after")
    def _check_probs(self):
        for field in ("probs_start", "probs_end"):
            probs = getattr(self, field)
            if probs is None:
                continue
            if len(probs) != len(self.strategies):
                raise ValueError(f"{field} has {len(probs)} entries for {len(self.strategies)} strategies")
            if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(f"{field} must be non-negative and sum to 1, got {probs}")
        return self


class CurriculumMasker(Masker):
    """Schedules the mask ratio, and the choice among several maskers, over training.

    It builds each strategy by name (with the registry active, as during recipe preparation) for the same
    grid, and before every optimizer step (`set_progress(step, epoch)`):

    * computes f = shape(p) with p = clamp(t / span, 0, 1), t the step or the fractional epoch, and
      shape(p) = 0 (constant), p (linear), (1 - cos πp) / 2 (cosine) or min(⌊p·steps⌋, steps-1) / (steps-1)
      (step); the ratio is start + (end - start)·f and is set on every strategy (`options.ratio`);
    * picks this step's strategy with probabilities probs_start + (probs_end - probs_start)·f, drawing one
      number from torch's global CPU generator (only when there are two or more strategies), which the
      engine saves and restores, so resumed runs choose the same strategies.

    The ratio and strategy are fixed for the whole step, so every sample of a batch hides the same number
    of tokens; the count may change between steps. Before the first `set_progress` the ratio is the
    schedule's value at 0 and the strategy the most probable one at 0.
    `__call__(B, device)` returns the chosen strategy's mask: ids_keep [B, V], ids_restore [B, N],
    masked [B, N]. State (saved in checkpoints): step, epoch, ratio, strategy index, inner maskers' states.
    """

    Options = CurriculumOptions

    def __init__(self, options: CurriculumOptions, spec: TokenSpec):
        super().__init__(options, spec)
        self.maskers: list[Masker] = []
        for i, strategy in enumerate(options.strategies):
            label = f"strategies[{i}] ({strategy.name})"
            if "ratio" in strategy.options:
                raise ValueError(f"{label}: remove options.ratio; the curriculum sets the ratio from start/end")
            try:
                masker = build_component("masker", strategy.name, strategy.options, spec)
            except PluginError as err:
                raise ValueError(f"{label}: {err}") from err
            except (ValueError, TypeError) as err:
                raise ValueError(f"{label}: {type(err).__name__}: {err}") from err
            if "ratio" not in type(masker.options).model_fields:
                raise ValueError(f"{label}: masker {strategy.name!r} has no `ratio` option for the curriculum to "
                                 f"schedule (its options: {', '.join(type(masker.options).model_fields) or 'none'})")
            self._check_reachable_ratios(label, masker)
            self.maskers.append(masker)
        count = len(self.maskers)
        first_only = [1.0] + [0.0] * (count - 1)
        self.probs_start = list(options.probs_start or options.probs_end or first_only)
        self.probs_end = list(options.probs_end or self.probs_start)
        self.step, self.epoch = 0, 0.0
        self.ratio = self.ratio_at(0.0)
        start_probs = self.probs_at(0.0)
        self.index = max(range(count), key=lambda i: start_probs[i])
        self._apply_ratio()

    # --- the schedule ----------------------------------------------------------------------------------

    def factor(self, t: float) -> float:
        """Schedule position in [0, 1] at t (steps or epochs, per `unit`)."""
        o = self.options
        p = min(max(t / o.span, 0.0), 1.0)
        if o.shape == "constant":
            return 0.0
        if o.shape == "linear":
            return p
        if o.shape == "cosine":
            return (1 - math.cos(math.pi * p)) / 2
        return min(math.floor(p * o.steps), o.steps - 1) / (o.steps - 1)

    def ratio_at(self, t: float) -> float:
        o = self.options
        f = self.factor(t)
        return o.start if f == 0 else o.end if f == 1 else o.start + (o.end - o.start) * f

    def probs_at(self, t: float) -> list[float]:
        f = self.factor(t)
        return [a + (b - a) * f for a, b in zip(self.probs_start, self.probs_end)]

    def reachable_ratios(self) -> list[float]:
        """The ratios the schedule takes (every plateau of `step`, 101 points of a continuous shape)."""
        o = self.options
        if o.shape == "constant":
            fractions = [0.0]
        elif o.shape == "step":
            fractions = [k / (o.steps - 1) for k in range(o.steps)]
        else:
            fractions = [k / 100 for k in range(101)]
        return [o.start if f == 0 else o.end if f == 1 else o.start + (o.end - o.start) * f for f in fractions]

    def _check_reachable_ratios(self, label: str, masker: Masker) -> None:
        """Reject at construction a strategy whose options cannot take a ratio the schedule will reach."""
        o = self.options
        current = masker.options.model_dump()
        for ratio in self.reachable_ratios():
            try:
                type(masker.options).model_validate({**current, "ratio": ratio})
            except ValidationError as err:
                message = "; ".join(e["msg"] for e in err.errors())
                raise ValueError(f"{label}: the {o.shape} schedule from {o.start} to {o.end} reaches ratio "
                                 f"{ratio:.4g}, which this masker rejects: {message}") from None

    def check_counts(self, field: str = "start") -> None:
        """Every ratio the schedule reaches must leave each strategy at least one hidden and one visible token
        of the grid; `OptionError` at `start` or `end` (the nearer) otherwise."""
        o, total = self.options, self.spec.num_tokens
        try:
            for i, masker in enumerate(self.maskers):
                for ratio in self.reachable_ratios():
                    masker.options.ratio = ratio
                    visible = masker.visible_tokens()
                    if visible is None or 0 < visible < total:
                        continue
                    what = "hides none" if visible >= total else "keeps none visible"
                    raise OptionError("start" if abs(ratio - o.start) <= abs(ratio - o.end) else "end",
                                      f"strategies[{i}] ({o.strategies[i].name}): the {o.shape} schedule from "
                                      f"{o.start} to {o.end} reaches ratio {ratio:.4g}, which {what} of the {total} "
                                      f"tokens of grid {self.spec.grid}; every step needs a hidden and a visible token")
        finally:
            self._apply_ratio()

    def _apply_ratio(self) -> None:
        for masker in self.maskers:
            masker.options.ratio = self.ratio

    @property
    def current_ratio(self) -> float:
        """The mask ratio of the current step (for logging)."""
        return self.ratio

    @property
    def current_strategy(self) -> str:
        """The name of the masker that draws this step's masks."""
        return self.options.strategies[self.index].name

    # --- component protocol ----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Logged as masker/ratio and masker/strategy (index into `strategies`)."""
        return {"ratio": self.ratio, "strategy": float(self.index)}

    def attach(self, model: Any) -> None:
        for masker in self.maskers:
            masker.attach(model)

    def set_progress(self, step: int, epoch: float) -> None:
        self.step, self.epoch = step, epoch
        for masker in self.maskers:
            masker.set_progress(step, epoch)
        t = step if self.options.unit == "step" else epoch
        self.ratio = self.ratio_at(t)
        self._apply_ratio()
        if len(self.maskers) > 1:
            u = float(torch.rand(()))  # global CPU generator: no device sync, restored on resume
            self.index = _pick(self.probs_at(t), u)

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        return self.maskers[self.index](batch_size, device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "ratio": self.ratio, "strategy": self.index,
                "inner": [masker.state_dict() for masker in self.maskers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not 0 <= state["strategy"] < len(self.maskers):
            raise ValueError(f"checkpoint selects strategy {state['strategy']} but the curriculum has "
                             f"{len(self.maskers)}")
        self.step, self.epoch = int(state["step"]), float(state["epoch"])
        self.ratio, self.index = float(state["ratio"]), int(state["strategy"])
        self._apply_ratio()
        inner = state.get("inner", [{}] * len(self.maskers))
        if len(inner) != len(self.maskers):
            raise ValueError(f"checkpoint holds {len(inner)} strategy states for {len(self.maskers)} strategies")
        for masker, masker_state in zip(self.maskers, inner):
            masker.load_state_dict(masker_state)


def _pick(probs: list[float], u: float) -> int:
    """Index i with cumulative probability just above u in [0, 1); never a zero-probability entry."""
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total and p > 0:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)  # u at the rounding edge of the total


@hookimpl
def register_maskers(register):
    register("curriculum", CurriculumMasker)
