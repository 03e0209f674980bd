"""The policy: an HF causal LM split into a backbone and a loss head, sharded with FSDP2.

``Policy.forward`` runs the decoder (``model.model``) to its final hidden states and hands them
to :class:`LossHead`, which owns the LM head and computes either the fused policy loss or the
log-probs straight from ``(hidden, lm_head.weight)``: the (tokens x vocabulary) logits are never
materialized (``loss_impl="naive"`` does materialize them, as a baseline).

FSDP2 layout: ``fully_shard`` on every decoder block, on the loss head, and on the root. The
head is its own FSDP unit *because* it reads ``lm_head.weight`` inside its own ``forward``:
FSDP's pre-forward hook has unsharded the weight by then and its post-backward hook
reduce-scatters the weight's gradient, exactly as for an ``nn.Linear`` call.

With ``tensor_parallel_size`` k > 1 (a (dp, tp) mesh, see ``distributed.setup``) the head is
split along the vocabulary instead (:func:`split_head`), and the decoder stays under FSDP2 over
*every* process. The k ranks of a tensor-parallel group hold the same data, and after the loss
their hidden-state gradients are the same (the loss sums them over the group), so their decoder
gradients are the same too: FSDP's average over all processes is then the average over the
data-parallel ranks, exactly what FSDP over the data-parallel group alone would give, while the
decoder's parameters and optimizer state are sharded over all processes (k times less memory
each) and one copy of them exists, which no replica can drift away from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ASSETS_DIR, TINY_MODEL, Config
from .errors import ConfigError

log = logging.getLogger("opo_train")

TINY_DIR = ASSETS_DIR / "tiny_qwen3"


# ----------------------------------------------------------------------------------------------
# Tokenizer and HF model
# ----------------------------------------------------------------------------------------------

def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path = cfg.tokenizer or (str(TINY_DIR) if cfg.model == TINY_MODEL else cfg.model)
    if Path(path) == TINY_DIR or (Path(path) / "tokenizer.json").exists() and \
            not (Path(path) / "tokenizer_config.json").exists():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"),
                                      eos_token="<|endoftext|>", pad_token="<|pad|>",
                                      unk_token="<|unk|>")
    else:
        if not Path(path).exists():
            raise ConfigError(f"config key 'tokenizer'/'model': {path!r} is not a local directory "
                             "(nothing is downloaded at run time)")
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.chat_template not in ("auto", "true", "false"):
        tok.chat_template = cfg.chat_template  # the run's template: used, and exported with it
    return tok


def hf_config(cfg: Config):
    from transformers import AutoConfig
    path = TINY_DIR if cfg.model == TINY_MODEL else Path(cfg.model)
    if not path.exists():
        raise ConfigError(f"config key 'model': {cfg.model!r} is not a local directory "
                         "(nothing is downloaded at run time)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model': {cfg.model!r} has no config.json (a model folder "
                          f"as save_pretrained writes it: config.json, weights, tokenizer)")
    try:
        conf = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model': {cfg.model!r} cannot be read as an HF model: "
                          f"{' '.join(str(e).split())[:300]}") from None
    for k, v in cfg.model_overrides.items():
        if not hasattr(conf, k):
            raise ConfigError(f"config key 'model_overrides': {type(conf).__name__} has no field {k!r}")
        setattr(conf, k, v)
    return conf


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def attn_implementation(cfg: Config, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flash_attention_2" if flash_attn_available(device) else "sdpa"


def build_hf_model(cfg: Config, device: torch.device, *, for_rollout: bool = False):
    """The HF causal LM in fp32 (master weights) on ``device``; a random init for the tiny model
    (seeded by the caller), the checkpoint's weights for a local path."""
    from transformers import AutoModelForCausalLM
    conf = hf_config(cfg)
    attn = attn_implementation(cfg, device)
    # The trainer's copy keeps fp32 master weights; FSDP's mixed precision casts for compute.
    dtype = resolve_dtype(cfg, device) if for_rollout else torch.float32
    if cfg.model == TINY_MODEL or for_rollout:
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=attn, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, config=conf, attn_implementation=attn,
                                                     dtype=dtype)
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# Policy = backbone + loss head
# ----------------------------------------------------------------------------------------------

class LossHead(nn.Module):
    """Owns the LM head; turns final hidden states into a loss or log-probs without logits.

    forward(hidden (B, T, H) or (N, H), targets (B, T)/(N,) int64, mask like targets, *, mode):
    ``mode="logprobs"`` -> (logp fp32 like targets, entropy fp32 like targets);
    ``mode="loss"`` -> (loss fp32 scalar, metrics dict) via ``fused_policy_loss``.
    """

    def __init__(self, lm_head: nn.Linear, logit_scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.lm_head = lm_head
        # Set by split_head: this rank's rows of a vocabulary-split head, and the compute dtype
        # its fp32 shard is cast to (no FSDP unit does it for the split head).
        self.vocab_parallel = None
        self.compute_dtype = None
        # the model's own logit transform (opo_kernels.integrations.head_transform)
        self.transform = {"logit_scale": logit_scale, "softcap": softcap}

    def forward(self, hidden, targets, mask, *, mode: str, advantages=None, old_logps=None,
                loss_kwargs: dict | None = None, impl: str = "fused", backend: str = "auto",
                temperature: float = 1.0, cu_seqlens=None):
        import opo_kernels as ok
        weight, bias = self.lm_head.weight, self.lm_head.bias
        split = {}
        if self.vocab_parallel is not None:
            # Megatron's layout: the local rows [start, stop) and the tensor-parallel group;
            # to_local() keeps autograd, so the shard's gradient lands on the DTensor parameter.
            weight, bias = (None if t is None else t.to_local().to(self.compute_dtype)
                            for t in (weight, bias))
            split["vocab_parallel"] = self.vocab_parallel
        if impl == "naive":
            return self._naive(hidden, weight, bias, targets, mask, mode, advantages, old_logps,
                               loss_kwargs, temperature, cu_seqlens, **self.transform)
        if mode == "logprobs":
            logp, ent = ok.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=True, backend=backend, cu_seqlens=cu_seqlens,
                                           **split, **self.transform)
            # Not views: FSDP's pre-backward hook on a returned view is lost by in-place ops.
            return logp.clone(), ent.clone()
        return ok.fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask, bias=bias,
                                    temperature=temperature, backend=backend, cu_seqlens=cu_seqlens,
                                    **split, **self.transform, **(loss_kwargs or {}))

    @staticmethod
    def _naive(hidden, weight, bias, targets, mask, mode, advantages, old_logps, loss_kwargs,
               temperature, cu_seqlens, logit_scale, softcap):
        """The materializing baseline: logits -> log_softmax -> gather, then ``policy_loss``."""
        import opo_kernels as ok
        logits = F.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        lsm = torch.log_softmax(logits, dim=-1)
        safe = targets.clamp(0, logits.shape[-1] - 1)
        logp = lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (targets != -100)
        kw = dict(loss_kwargs or {})
        # The entropy bonus needs the entropy's gradient; otherwise it is a metric only.
        with torch.set_grad_enabled(torch.is_grad_enabled() and mode == "loss"
                                    and kw.get("entropy_coef", 0.0) > 0):
            entropy = -(lsm.exp() * lsm).sum(-1)
        if mode == "logprobs":
            return logp, entropy
        return ok.policy_loss(logp, old_logps, advantages, mask, entropy=entropy,
                              vocab_size=weight.shape[0], cu_seqlens=cu_seqlens, **kw)


class Policy(nn.Module):
    """backbone (``hf_model.model``: embeddings, decoder blocks, final norm) + :class:`LossHead`.

    forward(batch: dict, **head_kwargs): batch holds ``input_ids``, ``attention_mask`` (padded)
    or ``position_ids`` + ``cu_seqlens`` (packed), ``targets``, ``mask``.
    """

    def __init__(self, hf_model):
        super().__init__()
        self.backbone = hf_model.model
        from opo_kernels.integrations import head_transform
        self.head = LossHead(hf_model.lm_head, **head_transform(hf_model.config.get_text_config()))
        self.hf_config = hf_model.config

    def forward(self, batch: dict, **head_kwargs):
        if "cu_seqlens" in batch:
            # Padding-free: one row of concatenated sequences; flash-attn reads the boundaries
            # from the restarting position_ids.
            out = self.backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False)
            hidden = out.last_hidden_state.squeeze(0)
            return self.head(hidden, batch["targets"], batch["mask"], cu_seqlens=batch["cu_seqlens"],
                             **head_kwargs)
        out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False)
        return self.head(out.last_hidden_state, batch["targets"], batch["mask"], **head_kwargs)

    def hf_name(self, name: str) -> str:
        """Parameter name in the HF checkpoint layout."""
        if name.startswith("backbone."):
            return "model." + name[len("backbone."):]
        if name.startswith("head.lm_head."):
            return "lm_head." + name[len("head.lm_head."):]
        return name


REFERENCE_FILE = "reference_model.pt"


def build_reference(cfg: Config, info, policy: Policy, out_dir: Path, resumed: bool) -> Policy:
    """The frozen reference model of the KL term (``beta`` > 0), a plain (unsharded) Policy in
    the compute dtype on every rank, used under no_grad only.

    It is the policy as RL starts: for ``model: tiny`` (or after a warm start) a copy of the
    policy's weights at that moment, saved as ``reference_model.pt`` in ``output_dir`` so that a
    resumed run gets the same reference; otherwise the model path's weights. Collective when it
    copies (every rank gathers the FSDP shards)."""
    from transformers import AutoModelForCausalLM
    out_dir = Path(out_dir)
    dtype = resolve_dtype(cfg, info.device)
    copy = cfg.model == TINY_MODEL or cfg.sft_steps > 0
    if copy:
        path = out_dir / REFERENCE_FILE
        if resumed:
            if not path.exists():
                raise ConfigError(f"config key 'beta': resuming a run with beta > 0 needs its "
                                  f"reference model {str(path)!r}, which is missing")
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = {n: t.to("cpu", torch.float32).clone() for n, t in iter_full_params(policy)}
            if info.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                torch.save(state, tmp)
                tmp.replace(path)
        hf = AutoModelForCausalLM.from_config(policy.hf_config, attn_implementation=attn_implementation(cfg, info.device))
        missing, unexpected = hf.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(policy.hf_config, "tie_word_embeddings", False) else set()
        missing = [m for m in missing if "rotary" not in m and m not in tied]
        if missing or unexpected:
            raise RuntimeError(f"reference model: missing {missing}, unexpected {unexpected}")
        if tied:
            hf.tie_weights()
    else:
        hf = AutoModelForCausalLM.from_pretrained(cfg.model, config=hf_config(cfg),
                                                  attn_implementation=attn_implementation(cfg, info.device))
    hf = hf.to(info.device, dtype)
    ref = Policy(hf)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def lora_config(cfg: Config):
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("config key 'lora_r': LoRA needs peft (pip install peft)") from None
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none")


def add_lora(hf, cfg: Config):
    """LoRA adapters (peft) on the decoder's attention/MLP modules; everything else frozen,
    including the LM head, which the fused loss head keeps using as is."""
    from peft import inject_adapter_in_model
    conf = lora_config(cfg)
    try:
        inject_adapter_in_model(conf, hf.model)
    except ValueError as e:
        raise ConfigError(f"config key 'lora_target_modules': {' '.join(str(e).split())[:300]}") from None
    for n, p in hf.named_parameters():
        p.requires_grad_(".lora_" in n)
    return conf


def build_policy(cfg: Config, info, seed: int) -> Policy:
    """HF model -> (LoRA) -> Policy -> (optionally) activation checkpointing -> FSDP2."""
    torch.manual_seed(seed)  # the same random init on every rank
    hf = build_hf_model(cfg, info.device)
    lora = add_lora(hf, cfg) if cfg.lora_r else None
    if cfg.activation_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    policy.lora_config = lora
    policy.base_model_path = cfg.model
    policy.train()
    if cfg.fsdp:
        shard(policy, cfg, info)
    elif info.procs > 1:
        raise ConfigError("config key 'fsdp': false is only allowed in a single process")
    return policy


def head_rows(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of tensor-parallel rank ``tp_rank``: DTensor's ``Shard(0)`` split
    (``torch.chunk``: ceil(V / k) rows each, the last ones fewer)."""
    size = -(-vocab_size // tp_size)
    start = min(tp_rank * size, vocab_size)
    return start, min(start + size, vocab_size)


def split_head(policy: Policy, cfg: Config, info) -> set:
    """Split the LM head's weight (and bias) by rows over the tensor-parallel group: each becomes
    a DTensor on the (dp, tp) mesh placed ``(Replicate(), Shard(0))``, so rank (d, t) holds rows
    ``head_rows(V, k, t)`` (the same on every data-parallel rank d), the optimizer steps that
    shard, and checkpoints store the whole (V, H) tensor. The shard's gradient is averaged over
    the data-parallel group as soon as it is accumulated (FSDP's average, for the decoder, is
    over the same data-parallel ranks). Returns the head's parameters (FSDP leaves them alone)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from opo_kernels import VocabParallel
    head = policy.head
    lm = head.lm_head
    V = lm.weight.shape[0]
    start, stop = head_rows(V, info.tp_size, info.tp_rank)

    def dp_mean(p):  # every backward: the data-parallel ranks' shard gradients, averaged
        g = p.grad.to_local()
        dist.all_reduce(g, group=info.group)
        g.div_(info.world)

    params = set()
    for name in ("weight", "bias"):
        p = getattr(lm, name)
        if p is None:
            continue
        d = nn.Parameter(distribute_tensor(p.detach(), info.mesh, [Replicate(), Shard(0)]),
                         requires_grad=p.requires_grad)
        if d.to_local().shape[0] != stop - start:
            raise RuntimeError(f"lm_head.{name}: local shard has {d.to_local().shape[0]} rows, "
                               f"expected rows [{start}, {stop})")
        if info.world > 1 and d.requires_grad:
            d.register_post_accumulate_grad_hook(dp_mean)
        setattr(lm, name, d)
        params.add(d)
    head.vocab_parallel = VocabParallel(info.tp_group, start, stop)
    head.compute_dtype = resolve_dtype(cfg, info.device)
    return params


def shard(policy: Policy, cfg: Config, info) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # Over every process (with tensor parallelism too: see the module's docstring).
    mesh = init_device_mesh(info.device.type, (info.procs,))
    dtype = resolve_dtype(cfg, info.device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The root and the head receive the advantages and the anchor log-probs, which must stay
    # fp32: no input casting there (token ids are integers; hidden states are already bf16).
    mp_keep = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    for layer in policy.backbone.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if info.tp_size > 1:
        # The vocabulary-split head: its own DTensor shards, outside every FSDP unit.
        head = split_head(policy, cfg, info)
        fully_shard(policy, mesh=mesh, mp_policy=mp_keep, ignored_params=head)
        return
    if getattr(policy.hf_config, "tie_word_embeddings", False):
        # A tied head shares its weight with the embedding, which the root unit owns; the head
        # then runs inside the root's forward, whose pre-forward hook has unsharded that weight
        # (and whose post-backward reduce-scatters its gradient). A parameter may not belong to
        # two FSDP units, so the head gets no unit of its own.
        log.info("tied lm_head: the loss head is sharded with the root (one unit for embedding + head)")
    else:
        fully_shard(policy.head, mesh=mesh, mp_policy=mp_keep)
    fully_shard(policy, mesh=mesh, mp_policy=mp_keep)


def _full(p):
    t = p.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def iter_full_params(policy: Policy):
    """(HF name, full tensor) for every parameter of the plain HF model, gathered one at a time
    (FSDP2 DTensors). With LoRA, each adapted weight comes merged: W + (B @ A) · scaling."""
    pending: dict = {}
    for name, p in policy.named_parameters():
        if ".base_layer." not in name and ".lora_" not in name:
            yield policy.hf_name(name), _full(p)
            continue
        prefix = name.split(".base_layer.")[0] if ".base_layer." in name else name.split(".lora_")[0]
        part = "A" if ".lora_A." in name else "B" if ".lora_B." in name else name.rsplit(".", 1)[1]
        d = pending.setdefault(prefix, {})
        d[part] = _full(p)
        if {"A", "B", "weight"} <= d.keys():  # peft's order: base weight (bias), A, B
            mod = policy.get_submodule(prefix)
            scale = mod.scaling["default"]
            w = d["weight"]
            yield policy.hf_name(prefix + ".weight"), w + (d["B"].float() @ d["A"].float()).to(w.dtype) * scale
            if "bias" in d:
                yield policy.hf_name(prefix + ".bias"), d["bias"]
            del pending[prefix]


def save_adapter(policy: Policy, out_dir: Path, info) -> Path | None:
    """The LoRA adapter in peft's format (``PeftModel.from_pretrained(base, out_dir)``, then
    ``merge_and_unload()``). The base is ``base_model_name_or_path``: the run's model directory,
    or for the tiny random-init model a copy of its base weights saved next to the adapter."""
    lora = {policy.hf_name(n): _full(p).cpu() for n, p in policy.named_parameters() if ".lora_" in n}
    base = {}
    if policy.base_model_path == TINY_MODEL:
        for n, p in policy.named_parameters():
            if ".lora_" not in n:
                base[policy.hf_name(n.replace(".base_layer.", "."))] = _full(p).to("cpu", torch.float32)
    if not info.is_main:
        return None
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"base_model.model." + k.replace(".default.", "."): v.contiguous() for k, v in lora.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    conf = policy.lora_config
    if base:
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_config(policy.hf_config)
        m.load_state_dict(base, strict=False)
        m.save_pretrained(str(out_dir / "base_model"))
        conf.base_model_name_or_path = "base_model"
    else:
        conf.base_model_name_or_path = str(policy.base_model_path)
    conf.save_pretrained(str(out_dir))
    return out_dir


def param_count(policy: Policy) -> int:
    return sum(p.numel() for p in policy.parameters())


def trainable_params(policy: Policy) -> list:
    return [p for p in policy.parameters() if p.requires_grad]


def save_hf(policy: Policy, tokenizer, out_dir: Path, info) -> Path | None:
    """HF-format export (``from_pretrained`` loads it); gathered on every rank, written by rank 0.
    With LoRA the model is the merged one, and ``adapter/`` holds the adapter in peft's format."""
    import shutil

    from transformers import AutoModelForCausalLM
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if info.is_main and tmp.exists():
        shutil.rmtree(tmp)
    state = {n: t.to("cpu", torch.float32) for n, t in iter_full_params(policy)}
    if getattr(policy, "lora_config", None) is not None:
        save_adapter(policy, tmp / "adapter", info)
    if not info.is_main:
        return None
    conf = policy.hf_config
    model = AutoModelForCausalLM.from_config(conf)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(conf, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if "rotary" not in m and m not in tied]
    if missing or unexpected:
        raise RuntimeError(f"HF export: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    # Batched generate needs the prompts flush right (pad on the left); the trainer pads its own
    # batches, so the exported tokenizer says left whatever it was loaded with.
    tokenizer.save_pretrained(str(tmp))
    tc = tmp / "tokenizer_config.json"
    conf_json = json.loads(tc.read_text()) if tc.exists() else {}
    conf_json["padding_side"] = "left"
    tc.write_text(json.dumps(conf_json, indent=2))
    (tmp / "opo_train.json").write_text(json.dumps({"exported_by": "opo_train"}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
