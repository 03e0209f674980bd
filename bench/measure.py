"""Timers and peak-memory probes for one forward+backward ``step`` (see :mod:`bench.cases`).

Time. CUDA: ``triton.testing.do_bench`` median (it flushes L2 and sets the listed grads to None
before every call, outside the timed region). CPU timing is round-robin over all methods and
lives in :func:`bench.__main__.run_case`.

Memory: the peak of bytes allocated during one step above what was allocated when it started
(the inputs), minus the bytes of the gradients the step must return (d hidden, d weight): "peak
memory above inputs and gradients", i.e. total peak - (inputs + gradients), the
footprint every method has to hold anyway. (A method whose peak comes before its gradients
exist gains from the subtraction as much as one whose peak holds them; the raw peak above the
inputs is returned as well.) The gradients are set to None before the step, as
``zero_grad(set_to_none=True)`` leaves them in a training loop.

CUDA: ``torch.cuda.max_memory_allocated``. CPU has no allocator statistics, so the probe runs
the step under ``torch.profiler`` with ``profile_memory=True``, which records every allocation
and free of PyTorch's CPU allocator with its size, and takes the maximum of the running sum.
Unlike RSS deltas this is exact for tensor memory and blind to glibc's caching and to page
faults; it does not see memory a C++ extension takes with its own ``malloc``/``std::vector``
(small per-thread scratch in practice). Every tensor made through ``torch.empty`` and friends,
by eager ops, Inductor-generated code or extensions alike, is seen.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch


def time_cuda(step: Callable[[], None], grads: list, warmup: int, repeats: int):
    """Seconds per step via ``triton.testing.do_bench`` (median; 20th/80th percentiles kept)."""
    import triton.testing

    for _ in range(warmup):  # compile and autotune outside do_bench's own warm-up estimate
        for g in grads:
            g.grad = None
        step()
    torch.cuda.synchronize()
    q20, q50, q80 = triton.testing.do_bench(step, warmup=25, rep=max(100, 20 * repeats),
                                            grad_to_none=grads, quantiles=[0.2, 0.5, 0.8])
    return q50 / 1e3, [q20 / 1e3, q50 / 1e3, q80 / 1e3]


def _allocation_events(prof):
    from torch._C._profiler import _EventType

    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            ef = node.extra_fields
            if ef.device.type == "cpu":
                out.append((node.start_time_ns, ef.alloc_size))
    out.sort()
    return out


def peak_cpu(step: Callable[[], None], zero: Callable[[], None], grad_bytes: int):
    """(peak above the start minus ``grad_bytes``, bytes held at the end, raw peak above the
    start)."""
    from torch.profiler import ProfilerActivity, profile

    zero()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    run = peak = 0
    for _, size in _allocation_events(prof):
        run += size
        peak = max(peak, run)
    return peak - grad_bytes, run, peak


def peak_cuda(step: Callable[[], None], zero: Callable[[], None], grad_bytes: int):
    zero()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak - grad_bytes, torch.cuda.memory_allocated() - base, peak
