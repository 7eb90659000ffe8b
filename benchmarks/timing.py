"""Timing shared by the benchmarks: the median of synchronised wall-clock times after warm-up."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, warmup: int, iters: int, device) -> tuple[float, float]:
    """Median seconds per call of ``fn`` after ``warmup`` calls, and the peak GiB allocated over
    all of them (NaN off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak
