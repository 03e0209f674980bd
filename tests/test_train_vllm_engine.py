"""The vLLM engine's use of vLLM's API, against a stand-in ``vllm`` module (vLLM cannot run
here). Checks that in one process the engine core stays in-process (so
the model is reachable for weight pushes), weights wake before the KV cache with the new weights
loaded in between, tensor_parallel_size is passed on and refused without torchrun."""
import types

import pytest
import torch

from opo_train.config import load_config


class FakeLLM:
    calls: list = []

    def __init__(self, **kw):
        import os
        FakeLLM.calls.append(("init", kw, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")))
        model = types.SimpleNamespace(load_weights=lambda it: FakeLLM.calls.append(("load", len(list(it)))))
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))

    def sleep(self, level):
        FakeLLM.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        FakeLLM.calls.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        FakeLLM.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        FakeLLM.calls.append(("generate", len(prompts)))
        lp = types.SimpleNamespace
        out = types.SimpleNamespace(token_ids=[5, 6], finish_reason="stop",
                                    logprobs=[{5: lp(logprob=-1.0)}, {6: lp(logprob=-2.0)}])
        return [types.SimpleNamespace(outputs=[out] * p.n) for p in params]


@pytest.fixture
def fake_vllm(install_fake_vllm):
    return install_fake_vllm(FakeLLM)


def test_single_process_engine_is_in_process_and_wakes_in_order(fake_vllm):
    from opo_train.rollout import VLLMEngine
    cfg = load_config(None, ["engine=vllm", "tensor_parallel_size=1"])
    eng = VLLMEngine(cfg, tokenizer=None, device=torch.device("cuda", 0))
    kind, kw, env = fake_vllm.calls[0]
    assert env == "0" and "distributed_executor_backend" not in kw  # in-process engine core
    assert kw["enable_sleep_mode"] and kw["tensor_parallel_size"] == 1
    eng.sleep()
    eng.load_weights([("a", torch.zeros(1)), ("b", torch.zeros(1))])
    eng.wake()
    got = eng.generate([[1, 2], [3]], 2, seed=0)
    assert [len(g) for g in got] == [2, 2] and got[0][0].tokens == [5, 6]
    assert fake_vllm.calls[1:] == [("sleep", 1), ("wake_up", ("weights",)), ("load", 2),
                                   ("reset_prefix_cache",), ("wake_up", ("kv_cache",)), ("generate", 2)]


def test_tensor_parallel_needs_torchrun(fake_vllm):
    from opo_train.rollout import VLLMEngine
    cfg = load_config(None, ["engine=vllm", "tensor_parallel_size=2"])
    with pytest.raises(ValueError, match="'tensor_parallel_size'"):
        VLLMEngine(cfg, tokenizer=None, device=torch.device("cuda", 0))
