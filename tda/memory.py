"""Peak memory of a block of work: CUDA's allocator peak, or the process's resident set
size sampled in a background thread on CPU (reported as the increase over the start)."""

from __future__ import annotations

import os
import resource
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self):
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        self._start = rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        cpu_mb = (self._peak - self._start) / 2**20
        gpu_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20 if self._cuda else 0.0
        self.peak_mb = max(cpu_mb, gpu_mb)
        return False


def activation_numel(model: torch.nn.Module, x_one: torch.Tensor) -> int:
    """Elements of every module's output for one example (eval mode): the unit of the
    activation memory that batched work on the model holds."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            x_one = x_one.to(p.device)
            model(x_one.to(p.dtype) if x_one.is_floating_point() else x_one)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total
