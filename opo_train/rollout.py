"""Rollout engines behind one interface.

``engine.load_weights(named_tensors)`` receives the trainer's current weights (HF names, full
tensors gathered from the FSDP2 shards) at the start of every outer iteration;
``engine.generate(prompt_ids, n, seed)`` samples ``n`` completions per prompt and returns, for
each prompt, ``n`` :class:`Sample`; ``sleep()``/``wake()`` free and retake the engine's memory
around the training phase.

- :class:`HFEngine`: ``transformers`` ``generate`` on a private, unsharded copy of the model
  (CPU and GPU; the default).
- :class:`VLLMEngine`: a colocated vLLM ``LLM`` per rank (``distributed_executor_backend=
  "external_launcher"``, tensor parallel 1), sleep mode between phases. vLLM is an optional extra
  (``pip install opo[vllm]``); it could not be run on the machine this was written on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import ConfigError

log = logging.getLogger("opo_train")


@dataclass
class Sample:
    tokens: list[int]      # completion token ids, eos included when produced
    truncated: bool        # hit max_new_tokens without eos


class HFEngine:
    def __init__(self, cfg, tokenizer, device: torch.device):
        from .model import build_hf_model
        self.cfg, self.tok, self.device = cfg, tokenizer, device
        self.model = build_hf_model(cfg, device, for_rollout=True)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"rollout engine: no parameter {name!r} in the HF model")
            params[name].copy_(t.to(params[name].dtype))

    def sleep(self) -> None:
        pass  # the copy is small next to the trainer's state; nothing worth freeing

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, *, seed: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[Sample]]:
        cfg, tok = self.cfg, self.tok
        max_new = max_new_tokens or cfg.max_new_tokens
        L = max(len(p) for p in prompt_ids)
        pad = tok.pad_token_id
        # Left padding: every row's last prompt token sits at the same column.
        ids = torch.full((len(prompt_ids), L), pad, dtype=torch.long)
        att = torch.zeros((len(prompt_ids), L), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, L - len(p):] = torch.tensor(p)
            att[i, L - len(p):] = 1
        ids = ids.repeat_interleave(n, 0).to(self.device)
        att = att.repeat_interleave(n, 0).to(self.device)
        gen = dict(max_new_tokens=max_new, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                   use_cache=True)
        if greedy:
            gen.update(do_sample=False)
        else:
            gen.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        # Seeded per call: the samples of a step do not depend on what ran before (exact resume).
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=att, **gen)
        comp = out[:, L:].tolist()
        res: list[list[Sample]] = []
        for i in range(len(prompt_ids)):
            group = []
            for j in range(n):
                row = comp[i * n + j]
                if tok.eos_token_id in row:
                    k = row.index(tok.eos_token_id)
                    group.append(Sample(row[:k + 1], False))
                else:
                    row = [t for t in row if t != pad] if pad != tok.eos_token_id else row
                    group.append(Sample(row[:max_new], True))
            res.append(group)
        return res


class VLLMEngine:
    """Colocated vLLM: one engine per trainer rank, sharing its GPU.

    Weights: each outer iteration, ``load_weights`` streams the FSDP2 full tensors into vLLM's
    model (``model.load_weights`` does vLLM's own fusing of q/k/v and gate/up). Memory: with
    ``vllm_sleep`` the KV cache (level 1 sleep also offloads weights to CPU) is released during
    the training phase and retaken before the next rollout.
    """

    def __init__(self, cfg, tokenizer, device: torch.device):
        try:
            from vllm import LLM, SamplingParams  # noqa: F401
        except ImportError:
            raise ConfigError("config key 'engine': 'vllm' needs vLLM (pip install 'opo[vllm]')") from None
        from .model import TINY_DIR, TINY_MODEL, resolve_dtype
        if device.type != "cuda":
            raise ConfigError("config key 'engine': 'vllm' needs a CUDA device")
        self.cfg, self.tok = cfg, tokenizer
        path = str(TINY_DIR) if cfg.model == TINY_MODEL else cfg.model
        dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[resolve_dtype(cfg, device)]
        import os
        # Under torchrun every rank owns one engine on its own GPU (external_launcher: vLLM
        # joins the torchrun environment instead of spawning workers).
        launcher = {"distributed_executor_backend": "external_launcher"} if "RANK" in os.environ else {}
        self.llm = LLM(model=path, tokenizer=cfg.tokenizer or path, dtype=dtype,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                       enable_sleep_mode=cfg.vllm_sleep, seed=cfg.seed, tensor_parallel_size=1,
                       enable_prefix_caching=True, **launcher)
        self.asleep = False

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)  # V1 wraps the worker
        return worker.model_runner.model

    def load_weights(self, named_tensors) -> None:
        if self.asleep:
            self.wake()
        self._model().load_weights(((n, t) for n, t in named_tensors))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sleep(self) -> None:
        if self.cfg.vllm_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_ids, n, *, seed: int, greedy: bool = False, max_new_tokens=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self.wake()
        cfg = self.cfg
        # One seed per prompt: reproducible, and prompts do not share a random stream.
        sps = [SamplingParams(n=n, max_tokens=max_new_tokens or cfg.max_new_tokens, seed=seed + i,
                              temperature=0.0 if greedy else cfg.temperature,
                              top_p=1.0 if greedy else cfg.top_p) for i in range(len(prompt_ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sps,
                                 use_tqdm=False)
        res = []
        for o in outs:
            group = []
            for c in o.outputs:
                toks = list(c.token_ids)
                group.append(Sample(toks, c.finish_reason == "length"))
            res.append(group)
        return res


def make_engine(cfg, tokenizer, device):
    return VLLMEngine(cfg, tokenizer, device) if cfg.engine == "vllm" else HFEngine(cfg, tokenizer, device)
