import os

# Triton kernels are defined at import time; on a machine without CUDA they must be built for
# the interpreter, so the variable has to be set before opo_kernels is imported.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if _has_cuda else "cpu"


@pytest.fixture
def device():
    return DEVICE
