"""Benchmarks and paper figures for the OPO kernels.

- ``python -m bench``: forward+backward time and peak memory of ``fused_opo_loss`` (every backend
  that runs on the device) against a naive materializing OPO, the same under ``torch.compile``,
  Liger-Kernel's GRPO losses, Apple's cut-cross-entropy, TRL's fused LM head, PyTorch's chunked
  linear_cross_entropy and the bare LM-head GEMM floor. Modules: :mod:`bench.cases` (shapes, inputs, the method registry),
  :mod:`bench.measure` (timers and memory probes), :mod:`bench.report` (JSON, markdown, plots).
- ``python -m bench.saturation``: the paper's Figure 4 (gradient saturation on a binary-logit toy).
- ``python -m bench.dynamics``: the paper's Figs. 5-8 in miniature, on the trainer's toy task.
- ``pytest bench/bench_losses.py``: the same cases as a pytest-benchmark suite (not collected by
  the default test run).
"""
