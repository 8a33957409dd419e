"""Metrics between two log lines: per-step device tensors summed on the device, read in one host sync."""
from __future__ import annotations

import platform
import time

import torch


class LogWindow:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that reported each key (a joint step reports its modality's)
        self.steps, self.start, self.data_wait = 0, time.perf_counter(), 0.0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def flush(self, effective_batch: int) -> dict[str, float]:
        """Means over the steps of the window that reported each key, plus img_s and data_wait (fraction of
        wall time blocked on the loader)."""
        metrics = {key: float(value) / self.counts[key] for key, value in self.sums.items()}  # the host sync
        elapsed = time.perf_counter() - self.start
        metrics["img_s"] = round(self.steps * effective_batch / elapsed, 2)
        metrics["data_wait"] = round(self.data_wait / elapsed, 4)
        self.__init__()
        return metrics


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
