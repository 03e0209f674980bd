"""Rollout engines behind one interface.

``engine.load_weights(named_tensors)`` receives the trainer's current weights (HF names, full
tensors gathered from the FSDP2 shards) at the start of every outer iteration;
``engine.generate(prompt_ids, n, seed)`` samples ``n`` completions per prompt and returns, for
each prompt, ``n`` :class:`Sample`, each with the log-probs the engine sampled its tokens from
(``Sample.logprobs``: the distribution after temperature and top-p, i.e. what was actually
sampled; None for greedy decoding); ``sleep()``/``wake()`` free and retake the engine's memory
around the training phase.

- :class:`HFEngine`: ``transformers`` ``generate`` on a private, unsharded copy of the model
  (CPU and GPU; the default).
- :class:`VLLMEngine`: a colocated vLLM ``LLM`` per rank or tensor-parallel group (external
  launcher under torchrun, an in-process engine core otherwise), sleep mode between phases. vLLM
  is an optional extra (``pip install opo[vllm]``); it has not been run by us (no GPU here).
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
    logprobs: list[float] | None = None  # log π_rollout(token) per token (None: greedy / not asked)


class _SampledLogprobs:
    """A stopping criterion that stops nothing: at every decoding step HF calls it with the ids
    including the token just sampled and the scores it was sampled from (``output_scores``: the
    logits after every logits processor and warper: temperature, top-p, ...). It keeps
    ``log_softmax(scores)[sampled id]`` and frees the (rows x vocabulary) scores right away, so
    the memory stays O(rows x vocabulary) instead of O(rows x vocabulary x new tokens)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores, **kwargs):
        if not isinstance(scores, tuple) or not scores:
            raise RuntimeError("rollout log-probs: generate() passed no scores to the stopping "
                               "criteria (transformers changed how it calls them)")
        last = scores[-1]
        lp = torch.log_softmax(last.float(), dim=-1).gather(-1, input_ids[:, -1:]).squeeze(-1)
        self.steps.append(lp.cpu())
        last.set_()  # the tuple keeps the tensor object; its storage goes now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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
        if not prompt_ids:  # a tensor-parallel rank's empty part of its group's prompts
            return []
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
        rec = None
        if greedy:
            gen.update(do_sample=False)
        else:
            from transformers import StoppingCriteriaList
            rec = _SampledLogprobs()
            gen.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                       output_scores=True, return_dict_in_generate=True,
                       stopping_criteria=StoppingCriteriaList([rec]))
        # Seeded per call: the samples of a step do not depend on what ran before (exact resume).
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=att, **gen)
        seqs = out.sequences if rec is not None else out
        comp = seqs[:, L:].tolist()
        # (rows, generated steps); a step HF ran and then undid (deferred stop check) is past
        # every row's end and never read.
        lps = torch.stack(rec.steps, 1).tolist() if rec is not None and rec.steps else None
        res: list[list[Sample]] = []
        for i in range(len(prompt_ids)):
            group = []
            for j in range(n):
                r = i * n + j
                row = comp[r]
                if tok.eos_token_id in row:  # what follows the eos is padding: no log-probs
                    k = row.index(tok.eos_token_id)
                    toks, trunc = row[:k + 1], False
                else:  # never finished: every position was sampled (even a sampled pad id)
                    toks, trunc = row[:max_new], True
                group.append(Sample(toks, trunc, lps[r][:len(toks)] if lps is not None else None))
            res.append(group)
        return res


class VLLMEngine:
    """Colocated vLLM: one engine per trainer rank (or per group of ``tensor_parallel_size``
    ranks), sharing the GPU with the trainer. Written against vLLM's public ``LLM`` API (read
    for vLLM 0.33); it has not been run by us: no GPU where it was written.

    - In one process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps vLLM's engine core inside the
      trainer's process (its default would start it in another process, where the model cannot
      be reached to push weights). Under torchrun: ``distributed_executor_backend=
      "external_launcher"``, which joins the torchrun ranks instead of spawning workers.
    - ``tensor_parallel_size`` k > 1 (torchrun only, k dividing the world): consecutive ranks
      form one engine; they gather their prompts, generate them together, and each keeps its own.
    - Weights: ``load_weights`` streams the FSDP2 full tensors (LoRA merged) into vLLM's model
      (``model.load_weights`` does vLLM's own fusing of q/k/v and gate/up, and TP slicing).
    - Memory (``vllm_sleep``): after a rollout, ``sleep(level=1)`` offloads the weights to CPU
      and drops the KV cache; before the next one the weights wake first, the new weights are
      loaded, and only then is the KV cache reallocated (``wake_up(tags=...)``), so the peak
      never holds both the old KV cache and the trainer's state.
    """

    def __init__(self, cfg, tokenizer, device: torch.device):
        import os
        try:
            from vllm import LLM, SamplingParams  # noqa: F401
        except ImportError:
            raise ConfigError("config key 'engine': 'vllm' needs vLLM (pip install 'opo[vllm]')") from None
        from .model import TINY_DIR, TINY_MODEL, resolve_dtype
        if device.type != "cuda":
            raise ConfigError("config key 'engine': 'vllm' needs a CUDA device")
        self.cfg, self.tok = cfg, tokenizer
        tp = cfg.tensor_parallel_size
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        world = int(os.environ.get("WORLD_SIZE", 1))
        if tp > 1 and (not launched or world % tp):
            raise ConfigError(f"config key 'tensor_parallel_size': {tp} needs torchrun with a number "
                              f"of processes divisible by it (got {world if launched else 'no torchrun'})")
        self.tp_group = None
        if tp > 1:
            import torch.distributed as dist
            self.tp_group, _ = dist.new_subgroups(group_size=tp)
        path = str(TINY_DIR) if cfg.model == TINY_MODEL else cfg.model
        dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[resolve_dtype(cfg, device)]
        if launched:
            extra = {"distributed_executor_backend": "external_launcher"}
        else:
            # In-process engine core: the model (and load_weights) is reachable from here.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            extra = {}
        self.llm = LLM(model=path, tokenizer=cfg.tokenizer or path, dtype=dtype,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                       enable_sleep_mode=cfg.vllm_sleep, seed=cfg.seed, tensor_parallel_size=tp,
                       enable_prefix_caching=True,
                       # the log-probs of the distribution sampled from (after temperature /
                       # top-p), as the HF engine reports them and TRL asks vLLM for them
                       logprobs_mode="processed_logprobs", **extra)
        self.asleep = False       # weights offloaded, KV cache dropped
        self.kv_ready = True

    def _model(self):
        """vLLM's model object in this process (in-process engine core or external launcher)."""
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is None:  # V1 without the compatibility attribute: the in-process core's
            core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
            executor = getattr(core, "model_executor", None)
        if executor is None:
            return None
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)  # V1 wraps the worker
        return worker.model_runner.model

    def load_weights(self, named_tensors) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # weights back first; the KV cache after the load
            self.asleep, self.kv_ready = False, False
        model = self._model()
        if model is not None:
            model.load_weights(((n, t) for n, t in named_tensors))
        else:  # public fallback: runs the function on every worker's model (in-process here)
            tensors = list(named_tensors)
            self.llm.apply_model(lambda m: m.load_weights(iter(tensors)))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sleep(self) -> None:
        if self.cfg.vllm_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep, self.kv_ready = True, False

    def wake(self) -> None:
        """Called before sampling: weights (if still asleep), then the KV cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep = False
        if not self.kv_ready:
            self.llm.wake_up(tags=["kv_cache"])
            self.kv_ready = True

    def generate(self, prompt_ids, n, *, seed: int, greedy: bool = False, max_new_tokens=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self.wake()
        cfg = self.cfg
        jobs = [(seed + i, p) for i, p in enumerate(prompt_ids)]  # one seed per prompt
        mine = slice(0, len(jobs))
        if self.tp_group is not None:  # one engine per TP group: everyone generates everything
            import torch.distributed as dist
            parts = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(parts, jobs, group=self.tp_group)
            r = dist.get_rank(self.tp_group)
            start = sum(len(x) for x in parts[:r])
            mine = slice(start, start + len(jobs))
            jobs = [j for part in parts for j in part]
        # logprobs=0: the log-prob of each sampled token only (one dict per token, keyed by it)
        sps = [SamplingParams(n=n, max_tokens=max_new_tokens or cfg.max_new_tokens, seed=sd,
                              temperature=0.0 if greedy else cfg.temperature,
                              top_p=1.0 if greedy else cfg.top_p,
                              logprobs=None if greedy else 0) for sd, _ in jobs]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for _, p in jobs], sps,
                                 use_tqdm=False)
        res = []
        for o in outs[mine]:
            res.append([Sample(list(c.token_ids), c.finish_reason == "length",
                               None if greedy else _sampled_logprobs(c)) for c in o.outputs])
        return res


def _sampled_logprobs(completion) -> list[float]:
    """vLLM's ``CompletionOutput.logprobs`` (one ``{token id: Logprob}`` per generated token)
    -> the sampled tokens' log-probs."""
    lps = completion.logprobs
    ids = list(completion.token_ids)
    if lps is None or len(lps) != len(ids):
        raise RuntimeError(f"vLLM returned {'no' if lps is None else len(lps)} log-probs for "
                           f"{len(ids)} sampled tokens (SamplingParams(logprobs=0) was asked)")
    return [float(d[t].logprob) for d, t in zip(lps, ids)]


def make_engine(cfg, tokenizer, device):
    return VLLMEngine(cfg, tokenizer, device) if cfg.engine == "vllm" else HFEngine(cfg, tokenizer, device)
