"""The policy: an HF causal LM split into a backbone and a loss head, sharded with FSDP2.

``Policy.forward`` runs the decoder (``model.model``) to its final hidden states and hands them
to :class:`LossHead`, which owns the LM head and computes either the fused policy loss or the
log-probs straight from ``(hidden, lm_head.weight)``: the (tokens x vocabulary) logits are never
materialized (``loss_impl="naive"`` does materialize them, as a baseline).

FSDP2 layout: ``fully_shard`` on every decoder block, on the loss head, and on the root. The
head is its own FSDP unit *because* it reads ``lm_head.weight`` inside its own ``forward``:
FSDP's pre-forward hook has unsharded the weight by then and its post-backward hook
reduce-scatters the weight's gradient, exactly as for an ``nn.Linear`` call.
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
    return tok


def hf_config(cfg: Config):
    from transformers import AutoConfig
    path = TINY_DIR if cfg.model == TINY_MODEL else Path(cfg.model)
    if not path.exists():
        raise ConfigError(f"config key 'model': {cfg.model!r} is not a local directory "
                         "(nothing is downloaded at run time)")
    conf = AutoConfig.from_pretrained(str(path))
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

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden, targets, mask, *, mode: str, advantages=None, old_logps=None,
                loss_kwargs: dict | None = None, impl: str = "fused", backend: str = "auto",
                temperature: float = 1.0, cu_seqlens=None):
        import opo_kernels as ok
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if impl == "naive":
            return self._naive(hidden, weight, bias, targets, mask, mode, advantages, old_logps,
                               loss_kwargs, temperature, cu_seqlens)
        if mode == "logprobs":
            logp, ent = ok.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=True, backend=backend, cu_seqlens=cu_seqlens)
            # Not views: FSDP's pre-backward hook on a returned view is lost by in-place ops.
            return logp.clone(), ent.clone()
        return ok.fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask, bias=bias,
                                    temperature=temperature, backend=backend, cu_seqlens=cu_seqlens,
                                    **(loss_kwargs or {}))

    @staticmethod
    def _naive(hidden, weight, bias, targets, mask, mode, advantages, old_logps, loss_kwargs,
               temperature, cu_seqlens):
        """The materializing baseline: logits -> log_softmax -> gather, then ``policy_loss``."""
        import opo_kernels as ok
        logits = F.linear(hidden, weight, bias).float() / temperature
        lsm = torch.log_softmax(logits, dim=-1)
        safe = targets.clamp(0, logits.shape[-1] - 1)
        logp = lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (targets != -100)
        with torch.no_grad():
            entropy = -(lsm.exp() * lsm).sum(-1)
        if mode == "logprobs":
            return logp, entropy
        kw = dict(loss_kwargs or {})
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
        self.head = LossHead(hf_model.lm_head)
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


def build_policy(cfg: Config, info, seed: int) -> Policy:
    """HF model -> Policy -> (optionally) activation checkpointing -> FSDP2."""
    torch.manual_seed(seed)  # the same random init on every rank
    hf = build_hf_model(cfg, info.device)
    if cfg.activation_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    policy.train()
    if cfg.fsdp:
        shard(policy, cfg, info)
    elif info.world > 1:
        raise ConfigError("config key 'fsdp': false is only allowed in a single process")
    return policy


def shard(policy: Policy, cfg: Config, info) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(info.device.type, (info.world,))
    dtype = resolve_dtype(cfg, info.device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The root and the head receive the advantages and the anchor log-probs, which must stay
    # fp32: no input casting there (token ids are integers; hidden states are already bf16).
    mp_keep = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    for layer in policy.backbone.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if getattr(policy.hf_config, "tie_word_embeddings", False):
        # A tied head shares its weight with the embedding, which the root unit owns; the head
        # then runs inside the root's forward, whose pre-forward hook has unsharded that weight
        # (and whose post-backward reduce-scatters its gradient). A parameter may not belong to
        # two FSDP units, so the head gets no unit of its own.
        log.info("tied lm_head: the loss head is sharded with the root (one unit for embedding + head)")
    else:
        fully_shard(policy.head, mesh=mesh, mp_policy=mp_keep)
    fully_shard(policy, mesh=mesh, mp_policy=mp_keep)


def iter_full_params(policy: Policy):
    """(HF name, full tensor) for every parameter, gathered one at a time (FSDP2 DTensors)."""
    for name, p in policy.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield policy.hf_name(name), t


def param_count(policy: Policy) -> int:
    return sum(p.numel() for p in policy.parameters())


def save_hf(policy: Policy, tokenizer, out_dir: Path, info) -> Path | None:
    """HF-format export (``from_pretrained`` loads it); gathered on every rank, written by rank 0."""
    from transformers import AutoModelForCausalLM
    state = {n: t.to("cpu", torch.float32) for n, t in iter_full_params(policy)}
    if not info.is_main:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
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
        import shutil
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
