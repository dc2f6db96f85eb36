"""Peak memory of a piece of work: CUDA allocator peak on a GPU, sampled RSS on the CPU.

Why sampling: ``resource.getrusage(...).ru_maxrss`` is a process-lifetime high-water mark (it
cannot be reset between the two paths) and tracemalloc does not see torch's allocations. A thread
reads the process RSS every few milliseconds while the work runs (torch releases the GIL in its
kernels, so the sampler keeps running); the figure is the peak minus the RSS just before the work.
Run each measured path in a fresh process so memory the allocator kept from the other path does
not hide its peak.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


@dataclass
class PeakMemory:
    kind: str  # "cuda_allocated" | "cpu_rss"
    baseline_bytes: int
    peak_bytes: int

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


class PeakRSSSampler:
    """Context manager: samples this process's RSS every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSSSampler":
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    def result(self) -> PeakMemory:
        return PeakMemory("cpu_rss", self.baseline, self.peak)


class PeakMemoryMeter:
    """``torch.cuda.max_memory_allocated`` on CUDA, ``PeakRSSSampler`` otherwise."""

    def __init__(self, device):
        self.device = device
        self._sampler: PeakRSSSampler | None = None
        self._baseline = 0
        self._result: PeakMemory | None = None

    def __enter__(self) -> "PeakMemoryMeter":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._sampler = PeakRSSSampler().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._result = PeakMemory("cuda_allocated", self._baseline, torch.cuda.max_memory_allocated(self.device))
        else:
            assert self._sampler is not None
            self._sampler.__exit__(*exc)
            self._result = self._sampler.result()

    def result(self) -> PeakMemory:
        if self._result is None:
            raise RuntimeError("the meter has not finished")
        return self._result
