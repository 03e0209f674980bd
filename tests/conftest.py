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


@pytest.fixture
def install_fake_vllm(monkeypatch):
    """``install_fake_vllm(LLM)``: a stand-in ``vllm`` module (``LLM``, ``SamplingParams``,
    ``vllm.inputs.TokensPrompt``) for the engine code, which cannot run vLLM here; the torchrun
    variables are cleared so the engine takes its single-process path."""
    import sys
    import types

    def install(llm_cls):
        vllm = types.ModuleType("vllm")
        vllm.LLM = llm_cls
        vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
        for k in ("RANK", "WORLD_SIZE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
            monkeypatch.delenv(k, raising=False)
        llm_cls.calls = []
        return llm_cls
    return install
