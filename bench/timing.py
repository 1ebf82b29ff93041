"""The timing loop the benches share: warm-up (and peak GPU memory) per variant, then alternating rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_times(variants: dict[str, Callable[[], None]], *, repeats: int, device: str
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per variant over ``repeats`` rounds (variants alternate, so machine noise hits all alike),
    and the peak GPU memory (GiB) of each variant's warm-up call on CUDA (empty on the CPU)."""
    cuda = device.startswith("cuda")
    peak: dict[str, float] = {}
    for name, fn in variants.items():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peak[name] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, peak
