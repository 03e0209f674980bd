"""Choose the implementation behind a ``backend=`` string.

The vocabulary pass has one contract (see :mod:`opo_kernels.vocab_torch`) and three
implementations: ``triton`` (:mod:`opo_kernels.vocab_triton`; on CPU tensors it runs under
``TRITON_INTERPRET=1``), ``native`` (the C++/OpenMP op in ``csrc/``, loaded by
:mod:`opo_kernels.native`) and ``torch``. ``fused`` (:mod:`opo_kernels.fused_linear`) replaces
the whole GEMM + vocabulary pass and is dispatched one level up, in :mod:`opo_kernels.functional`.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "torch", "fused", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "opo_kernels is imported")
        return backend
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from . import native
        return "native" if native.available() else "torch"
    return "torch"


def vocab_pass(backend: str):
    """Return ``(vocab_forward, vocab_backward)`` for a concrete chunked backend."""
    if backend == "triton":
        from . import vocab_triton as mod
    elif backend == "native":
        from . import native as mod
        if not mod.available():
            warnings.warn("opo_kernels: native CPU op unavailable; using the torch vocabulary pass",
                          RuntimeWarning, stacklevel=3)
            from . import vocab_torch as mod
    else:
        from . import vocab_torch as mod
    return mod.vocab_forward, mod.vocab_backward
