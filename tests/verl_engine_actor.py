"""A verl actor on CPU: verl 0.9.1's own FSDP2 engine (``FSDPEngineWithLMHead``) on the shipped tiny
Qwen3, driven as verl's trainer drives it (``left_right_2_no_padding``, ``infer_batch`` for the old
log-probs, ``forward_backward_batch`` / ``train_batch`` with verl's ``ppo_loss``), with
``loss_mode=opo`` and the ``opo_escort`` advantage estimator.

Run as a script (``python tests/verl_engine_actor.py OUT.json [--logprob-hook]``), in its own process:

- TRL is hidden (``sys.modules["trl"] = None``): verl 0.9.1's ``apply_monkey_patch`` imports
  ``AutoModelForCausalLMWithValueHead`` from TRL whenever TRL is importable, and TRL >= 1.0 no longer
  has it, so no verl actor builds next to TRL 1.16 (see the README, "Use with verl").
- verl 0.9.1 registers no CPU platform (it falls back to CUDA), so a minimal CPU platform (gloo,
  no device memory) is installed before verl's engine is imported. Test scaffolding only.

Writes the measured numbers to OUT.json; tests/test_integration_verl.py asserts on them.
"""
import contextlib
import functools
import json
import os
import socket
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

sys.modules["trl"] = None  # noqa: E402  (see the module docstring)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "opo_train" / "assets" / "tiny_qwen3"
B, P, R, G = 8, 4, 6, 4


def _cpu_platform():
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_base import PlatformBase

    def noop(*a, **k):
        return None

    zero = (lambda *a, **k: 0)
    module = types.SimpleNamespace(
        is_available=lambda: True, current_device=lambda: "cpu", device_count=lambda: 1, set_device=noop,
        synchronize=noop, manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed, empty_cache=noop,
        max_memory_allocated=zero, max_memory_reserved=zero, memory_allocated=zero, memory_reserved=zero,
        reset_peak_memory_stats=noop, mem_get_info=lambda *a, **k: (0, 0), get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state, is_initialized=lambda: True)

    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = module

        def is_available(self): return True
        def current_device(self): return "cpu"
        def device_count(self): return 1
        def set_device(self, i): pass
        def synchronize(self, i=None): pass
        def manual_seed(self, s): torch.manual_seed(s)
        def manual_seed_all(self, s): torch.manual_seed(s)
        def set_allocator_settings(self, s): pass
        def empty_cache(self): pass
        def get_device_capability(self, i=0): return (None, None)
        def communication_backend_name(self): return "gloo"
        def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
        def nvtx_range(self, msg): return contextlib.nullcontext()
        def profiler_start(self): pass
        def profiler_stop(self): pass
        def ray_resource_name(self): return "CPU"
        def ray_noset_envvars(self): return []
        def is_ipc_supported(self): return False
        def cudart(self): return None

    platform_manager.set_platform(CPUPlatform())


def _model_dir(tmp):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32)
    model.save_pretrained(tmp)
    PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"), pad_token="<|pad|>",
                            eos_token="<|endoftext|>", unk_token="<|unk|>").save_pretrained(tmp)
    return tmp


def _engine(path, fused):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    # no flash-attention on CPU: padded inputs, eager attention; fp32 throughout
    mc = HFModelConfig(path=path, use_remove_padding=False, enable_gradient_checkpointing=False,
                       use_fused_kernels=fused, override_config={"attn_implementation": "eager"})
    mc.model_type = "language_model"
    ec = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False,
                          mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    eng = FSDPEngineWithLMHead(model_config=mc, engine_config=ec, optimizer_config=FSDPOptimizerConfig(lr=1e-3),
                               checkpoint_config=CheckpointConfig())
    eng.initialize()
    return eng, mc


def _batch(extra, **meta):
    """verl's padded rollout batch (left-padded prompts, right-padded responses) as the trainer
    hands it to the actor."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding
    g = torch.Generator().manual_seed(0)
    plen = torch.tensor([4, 2, 3, 4, 1, 4, 2, 3])
    rlen = torch.tensor([6, 3, 5, 2, 6, 4, 1, 6])
    ids = torch.randint(3, 128, (B, P + R), generator=g)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        am[i, P - plen[i]:P + rlen[i]] = 1
    td = TensorDict({"input_ids": ids, "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0),
                     "prompts": ids[:, :P], "responses": ids[:, P:], "response_mask": am[:, P:].clone(), **extra},
                    batch_size=[B])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, use_remove_padding=False, use_dynamic_bsz=False, max_token_len_per_gpu=4096,
                         temperature=1.0, **meta)
    return td


def main(out_path, hook):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(s.getsockname()[1]))
    s.close()
    dist.init_process_group("gloo")
    _cpu_platform()
    from torch.distributed.tensor import DTensor
    from verl.workers.config.actor import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    import opo_kernels
    from opo_kernels.integrations import verl as opo_verl
    seen = set()
    if hook:
        opo_verl.enable_logprob_hook()
        fwd = opo_verl.forward_with_opo_backend

        @functools.wraps(fwd)
        def recording(self, *a, **k):  # what the hook is handed: FSDP2's sharded head
            seen.add(type(self.lm_head.weight).__name__)
            return fwd(self, *a, **k)
        opo_verl.forward_with_opo_backend = recording
    opo_verl.register(omega="estimator", alpha=0.4, mu=1.0)
    res = {"hook": hook}
    with tempfile.TemporaryDirectory() as tmp:
        eng, mc = _engine(_model_dir(tmp), fused=hook)
    res["forward"] = type(eng.module).forward.__qualname__

    # compute_log_prob, as verl's actor does it
    td = _batch({}, micro_batch_size_per_gpu=2, use_fused_kernels=hook, calculate_entropy=True, compute_loss=False)
    with eng.eval_mode():
        out = eng.infer_batch(td)
    logp = no_padding_2_padding(out["model_output"]["log_probs"], td).float()
    mask = td["response_mask"].to_padded_tensor().bool() if td["response_mask"].is_nested else td["response_mask"].bool()
    res["logp_finite"] = bool(torch.isfinite(logp[mask]).all())

    # the advantages from the opo_escort estimator (ω over the whole batch), off-policy old log-probs
    g = torch.Generator().manual_seed(1)
    old = logp + 0.3 * torch.randn(B, R, generator=g) * mask
    rewards = torch.zeros(B, R)
    rewards[torch.arange(B), mask.sum(-1) - 1] = torch.randn(B, generator=g)
    adv, _ = opo_verl.compute_opo_escort_advantage(rewards, mask.float(), index=np.arange(B) // G)

    def loss_and_grads(mb):
        td = _batch({"old_log_probs": old, "advantages": adv}, micro_batch_size_per_gpu=mb, use_fused_kernels=hook,
                    calculate_entropy=False, compute_loss=True, global_batch_size=B)
        cfg = FSDPActorConfig(strategy="fsdp2", rollout_n=G, ppo_micro_batch_size_per_gpu=mb, ppo_mini_batch_size=2,
                              policy_loss={"loss_mode": "opo"}, loss_agg_mode="seq-mean-token-mean",
                              entropy_coeff=0.0, use_kl_loss=False)
        cfg.model_config = mc
        with eng.train_mode():
            eng.optimizer_zero_grad()
            o = eng.forward_backward_batch(td, partial(ppo_loss, config=cfg))
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double()
                     for n, p in eng.module.named_parameters() if p.grad is not None}
        return float(sum(o["loss"])), grads, cfg

    runs = {mb: loss_and_grads(mb) for mb in (1, 2, 8)}
    # the whole-batch loss from opo's own policy_loss on the engine's log-probs, ω from the estimator
    omega = adv.sum(-1) / mask.sum(-1)
    want, _ = opo_kernels.policy_loss(logp, old, omega, mask, loss="opo", omega=omega)
    res["loss"] = {mb: r[0] for mb, r in runs.items()}
    res["opo_loss"] = float(want)
    ref = runs[8][1]
    res["n_grads"] = len(ref)
    res["grad_rel_diff"] = {mb: max(float((r[1][n] - ref[n]).norm() / ref[n].norm()) for n in ref)
                            for mb, r in runs.items()}
    # ω from each micro-batch's own advantages would be wrong: refused
    opo_verl.register(omega="call")
    try:
        loss_and_grads(2)
        res["per_call_refused"] = False
    except ValueError as e:
        res["per_call_refused"] = "opo_escort" in str(e)
    opo_verl.register(omega="estimator")

    # one update (train_batch: forward, backward, optimizer step) with loss_mode=opo
    cfg = runs[2][2]
    before = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in eng.module.named_parameters()}
    td = _batch({"old_log_probs": old, "advantages": adv}, micro_batch_size_per_gpu=2, use_fused_kernels=hook,
                calculate_entropy=False, compute_loss=True, global_batch_size=B)
    with eng.train_mode():
        o = eng.train_batch(td, partial(ppo_loss, config=cfg))
    after = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in eng.module.named_parameters()}
    res["moved"] = sum(not torch.equal(before[n], after[n]) for n in before)
    res["n_params"] = len(before)
    res["grad_norm"] = float(o["metrics"]["grad_norm"])
    res["head_types"] = sorted(seen)
    res["metrics"] = sorted(k for k in o["metrics"] if k.startswith("actor/opo"))
    Path(out_path).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--logprob-hook" in sys.argv[2:])
