"""What every training loop of the engine shares (pretraining and fine-tuning / probing): counting the
samples the loader had to skip, and turning a scheduler's preemption signal into a checkpoint."""
from __future__ import annotations

import signal

import torch
from torch import Tensor

from ..errors import MaeframeError

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(MaeframeError):
    """SIGTERM/SIGUSR1 arrived; last.pt was written at a step boundary. Exit code 75: requeue and resume."""

    exit_code = 75

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"stopped by signal {signal_name} at step {step}; {checkpoint} holds it: rerun with --resume")


class SampleCount:
    """Sample reads of a run and how many failed (`SeededDataset` skips unreadable files and reports them
    per sample); above `max_bad_fraction` of the reads the run stops with a clear error."""

    def __init__(self, max_bad_fraction: float):
        self.limit = max_bad_fraction
        self.seen = self.bad = 0

    def add(self, batch_size: int, failed: Tensor) -> None:
        """batch_size delivered samples, failed [B] reads skipped before each of them."""
        bad = int(failed.sum())
        self.bad += bad
        self.seen += batch_size + bad
        if self.bad > self.limit * self.seen:
            raise MaeframeError(f"{self.bad} of {self.seen} sample reads failed (more than "
                                f"data.max_bad_fraction={self.limit}); see the warnings for their paths")

    def state_dict(self) -> Tensor:
        return torch.tensor([self.seen, self.bad])

    def load_state_dict(self, state: Tensor | None) -> None:
        self.seen, self.bad = (int(v) for v in (state if state is not None else torch.zeros(2)))


class PreemptionSignals:
    """Between `install()` and `restore()`, SIGTERM / SIGUSR1 only record their name in `received`; the loop
    checks it at a step boundary, writes last.pt and raises `Preempted`. `restore()` puts the previous
    handlers back."""

    def __init__(self):
        self.received: str | None = None

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._record) for s in PREEMPT_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
