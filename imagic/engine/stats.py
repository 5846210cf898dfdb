"""Wall seconds and peak memory per stage of an edit, for the record."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator

import torch


class StageStats:
    """CUDA: the allocator's peak per stage; CPU: the process's peak RSS so far."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_memory_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_memory_bytes[name] = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_memory_bytes[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.seconds[name] = time.perf_counter() - start
