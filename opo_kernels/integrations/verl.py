"""opo's OPO loss in verl (>= 0.9.1): ``"opo"`` and ``"opo_group_softmax"`` in verl's policy-loss registry.

Turn it on in a verl run with these overrides (the module registers itself when imported, in every
process that imports it: the workers through ``external_lib``, the driver — which runs the advantage
estimator — through ``VERL_USE_EXTERNAL_MODULES``)::

    VERL_USE_EXTERNAL_MODULES=opo_kernels.integrations.verl OPO_VERL_OPTIONS='{"omega": "estimator"}'
    algorithm.adv_estimator=opo_escort                           # ω over the whole training batch
    actor_rollout_ref.model.external_lib=opo_kernels.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=opo            # or opo_group_softmax
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean    # paper mode (see below)

OPO's options (``alpha``, ``mu``, ``tau``, ``ratio``, ``normalize``, ``norm_scope``, ``max_log_ratio``,
``ref_correction`` for ``"opo"``; ``alpha``, ``mu``, ``tau``, ``max_log_ratio``, ``beta_r``,
``adaptive_tau`` for ``"opo_group_softmax"``; ``vocab_size`` for its adaptive τ, by default the actor
model's; ``omega``) come from ``register(**options)`` or, at import, from the JSON object in the
environment variable ``OPO_VERL_OPTIONS`` (e.g. ``'{"omega": "estimator", "alpha": 0.4, "mu": 1.0}'``).

The escort weights ω (``omega``):

- ``"estimator"`` (recommended): the advantage estimator ``opo_escort`` (registered with verl)
  computes GRPO's outcome advantages (``algorithm.norm_adv_by_std_in_grpo`` honoured) and turns them
  into ω over the whole training batch, in the driver; ``"opo"`` reads verl's advantages as ω. The
  update is then the same whatever ``ppo_micro_batch_size_per_gpu``, ``use_dynamic_bsz`` or the
  number of ranks.
- ``"call"`` (the default): ω from the advantages of each call. Right only when one call holds the
  whole mini-batch; when verl's ``global_batch_info`` shows other micro-batches or ranks, a
  ``ValueError`` says so (``norm_scope="group"`` with whole groups per call is allowed).

``loss_agg_mode`` → opo's aggregation:

- ``"seq-mean-token-mean"``: ``level="sequence", seq_reduce="mean"`` — the paper's loss (Δ the
  length-averaged sequence log-ratio, mean over sequences). Recommended.
- ``"seq-mean-token-sum"``: ``level="sequence", seq_reduce="sum"`` (Δ the summed log-ratio).
- ``"token-mean"`` (verl's default): ``level="token"`` — per-token Δ, token mean over the batch.
- ``"token-sum"`` and ``"seq-mean-token-sum-norm"``: no OPO counterpart → ``ValueError``.

verl's ``global_batch_info`` (``dp_size``, ``global_batch_size``, ``batch_num_tokens``) scales the
returned loss to this call's share of the global mean, exactly as verl's ``agg_loss`` scales its own
losses. ``"opo_group_softmax"`` takes ``group_size = actor.rollout_n``; each call must hold whole
prompt groups (``ppo_micro_batch_size_per_gpu`` a multiple of ``rollout_n``, no ``use_dynamic_bsz``).

Bad input (a ``response_mask`` that is not 0/1, negative or non-finite ``rollout_is_weights``, a
``global_batch_size`` or ``batch_num_tokens`` of 0, tensors whose shapes differ) raises a
``ValueError`` naming the argument and the value seen.

Advantages: verl hands them per token (B, T); OPO needs one per sequence, so they must be constant
over each sequence's valid tokens (GRPO-style outcome advantages) — token-varying advantages (GAE)
raise ``ValueError``.

Rollout correction (verl's ``rollout_is_weights``, detached, (B, T)): each token's gradient is
multiplied by its weight (for sequence-level weights: the sequence's term is weighted by its
weight, as docs/contract.md ("RL terms") defines it for token weights). The loss *value* returned is
the unweighted OPO loss; the weights' mean is logged as ``actor/opo_is_weight_mean``. (opo's own
``rollout_logps`` / ``is_correction`` form such weights from log-probs; verl hands finished weights.)

Log-prob hook: verl's fused log-prob path is
``verl.models.transformers.monkey_patch.patch_forward_with_backends`` (on with
``actor_rollout_ref.model.use_fused_kernels=True``), which replaces the model class's ``forward``
by ``verl.models.transformers.dense_common.forward_with_torch_backend`` /
``forward_with_triton_backend`` (verl's ``FusedLinearForPPO``, returning ``log_probs`` and
``entropy``). :func:`enable_logprob_hook` (or ``OPO_VERL_LOGPROBS=1`` in the environment when this
module is imported) replaces that function so that dense text models get
:func:`forward_with_opo_backend` instead: the same outputs from opo's deterministic, batch-invariant
``linear_logprobs(hidden, lm_head.weight, targets, temperature=T, return_entropy=True)`` (a
sharded FSDP2 head, a DTensor, is gathered first, its gradient going back to the shards).
Vision-language models keep verl's own forward. The entropy it returns is differentiable: its
gradient ∂H/∂z = −p ⊙ (log p + H) is formed in opo's vocabulary pass, so verl's ``entropy_coeff``
works through the hook.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from . import head_transform, require

_verl = require("verl", "0.9.1", "verl")
from verl.trainer.ppo import core_algos  # noqa: E402

from opo_kernels import escort_weights, linear_logprobs, policy_loss  # noqa: E402
from opo_kernels.checks import check_choice  # noqa: E402
from opo_kernels.options import ESCORT_OPTIONS, LOSS_OPTIONS  # noqa: E402

__all__ = ["register", "enable_logprob_hook", "disable_logprob_hook", "forward_with_opo_backend", "compute_policy_loss_opo", "compute_policy_loss_opo_group_softmax",
           "compute_opo_escort_advantage", "OPTIONS", "OMEGA_MODES", "ADV_ESTIMATOR"]

logger = logging.getLogger(__name__)

_AGG = {
    "seq-mean-token-mean": dict(level="sequence", seq_reduce="mean"),
    "seq-mean-token-sum": dict(level="sequence", seq_reduce="sum"),
    "token-mean": dict(level="token"),
}
# chosen by the registered name / loss_agg_mode / actor.rollout_n, never by an option
_RESERVED = {"level": "loss_agg_mode", "seq_reduce": "loss_agg_mode", "escort": "the registered name "
             "('opo' or 'opo_group_softmax')", "group_size": "actor.rollout_n", "loss": "the registered name"}

#: the OPO options every registered loss uses (set by :func:`register`)
OPTIONS: dict = {}


def _options_of(loss_type: str) -> tuple:
    """The options a registered loss takes: its loss type's own (opo_kernels.options), less those
    verl sets (_RESERVED); the rest of opo's options are verl's business (its own KL and entropy
    terms, its rollout correction)."""
    return tuple(o.name for o in LOSS_OPTIONS
                 if loss_type in o.read_by and o.kind == "loss" and o.name not in _RESERVED)


_PAPER_OPTIONS = _options_of("opo")
_GROUP_SOFTMAX_OPTIONS = _options_of("opo_group_softmax")
#: where ``"opo"`` takes its escort weights ω: ``"estimator"`` (verl's advantages are ω, formed over
#: the whole training batch by the advantage estimator :data:`ADV_ESTIMATOR`) or ``"call"`` (ω from the
#: advantages of each call, correct only when a call holds the whole batch)
OMEGA_MODES = ("estimator", "call")
#: the advantage estimator that emits ω (``algorithm.adv_estimator=opo_escort``)
ADV_ESTIMATOR = "opo_escort"
_STATE: dict = {"vocab_size": None, "omega": "call"}


def register(*, vocab_size: int | None = None, omega: str = "call", **options) -> None:
    """Register ``"opo"`` and ``"opo_group_softmax"`` in verl's policy-loss registry, and the advantage
    estimator ``"opo_escort"``, with these OPO options (checked here: a bad name or value raises
    ``ValueError``/``TypeError`` naming it).

    options: the paper weighting's (``alpha``, ``mu``, ``tau``, ``ratio``, ``normalize``, ``norm_scope``,
    ``max_log_ratio``, ``ref_correction``) and the group-softmax weighting's (``alpha``, ``mu``, ``tau``,
    ``max_log_ratio``, ``beta_r``, ``adaptive_tau``); each loss reads its own. vocab_size: V for the
    group-softmax adaptive τ (default: the actor model's config). omega: one of :data:`OMEGA_MODES`.
    """
    for k in options:
        if k in _RESERVED:
            raise ValueError(f"option {k!r} is set by {_RESERVED[k]} in verl, not by register()")
    unknown = sorted(set(options) - set(_PAPER_OPTIONS) - set(_GROUP_SOFTMAX_OPTIONS))
    if unknown:
        raise TypeError(f"register() got unknown option(s) {unknown}; the options of opo's verl losses are "
                        f"{sorted(set(_PAPER_OPTIONS) | set(_GROUP_SOFTMAX_OPTIONS))}")
    check_choice("omega", omega, OMEGA_MODES)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 2):
        raise ValueError(f"vocab_size must be an int >= 2 or None, got {vocab_size!r}")
    # validate once, on a tiny batch, for each weighting with the options it reads
    z = torch.zeros(2, 1)
    paper = {k: v for k, v in options.items() if k in _PAPER_OPTIONS}
    gs = {k: v for k, v in options.items() if k in _GROUP_SOFTMAX_OPTIONS}
    policy_loss(z, z, torch.zeros(2), loss="opo", **paper)
    policy_loss(z, z, torch.zeros(2), loss="opo", escort="group_softmax", group_size=2,
                vocab_size=vocab_size or 2, **gs)
    if omega == "estimator":
        bad = {k: v for k, v in paper.items() if k in ("norm_scope", "ref_correction") and
               v != {"norm_scope": "batch", "ref_correction": False}[k]}
        if bad:
            raise ValueError(f"omega='estimator' forms ω over the whole batch from the advantages alone: "
                             f"{bad} need it per call; use omega='call' with whole prompt groups per call")
    OPTIONS.clear()
    OPTIONS.update(options)
    _STATE.update(vocab_size=vocab_size, omega=omega)
    core_algos.register_policy_loss("opo")(compute_policy_loss_opo)
    core_algos.register_policy_loss("opo_group_softmax")(compute_policy_loss_opo_group_softmax)
    # set directly: a re-imported module brings a new function object, which register_adv_est refuses
    core_algos.ADV_ESTIMATOR_REGISTRY[ADV_ESTIMATOR] = compute_opo_escort_advantage


def compute_opo_escort_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                 index=None, config=None, **kwargs):
    """verl advantage estimator ``"opo_escort"``: GRPO's outcome advantages (verl's
    ``compute_grpo_outcome_advantage``, ``algorithm.norm_adv_by_std_in_grpo`` honoured), turned into
    the escort weights ω over the whole training batch (``escort_weights`` with the registered
    ``alpha``, ``tau``, ``normalize``). token_level_rewards, response_mask: (B, T); index: (B,) prompt
    ids. Returns ``(ω, ω)`` broadcast over each sequence's valid tokens, (B, T) fp32: the
    ``advantages`` that ``loss_mode=opo`` reads as ω with ``omega="estimator"``."""
    if _STATE["omega"] != "estimator":
        raise ValueError(f"algorithm.adv_estimator={ADV_ESTIMATOR!r} emits the escort weights ω; the 'opo' "
                         "loss reads them only with omega='estimator' (register(omega='estimator') or "
                         'OPO_VERL_OPTIONS=\'{"omega": "estimator"}\'), got omega=' + repr(_STATE["omega"]))
    if index is None:
        raise ValueError(f"algorithm.adv_estimator={ADV_ESTIMATOR!r} needs the prompt ids (verl's 'uid')")
    _check_mask(response_mask, token_level_rewards.shape)
    norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, index,
                                                       norm_adv_by_std_in_grpo=norm)
    mask = response_mask.bool()
    valid = mask.any(-1)
    a_seq = torch.where(mask, adv.float(), 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    eo = {k: v for k, v in OPTIONS.items() if k in ESCORT_OPTIONS and k not in ("norm_scope", "ref_correction")}
    omega = escort_weights(a_seq, valid=valid, **eo)
    out = torch.where(mask, omega[:, None], 0.0)
    return out, out


def _check_mask(response_mask, shape) -> None:
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a tensor, got {type(response_mask).__name__}")
    if tuple(response_mask.shape) != tuple(shape) or response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T) = {tuple(shape)}, got {tuple(response_mask.shape)}")
    if response_mask.dtype != torch.bool and bool(((response_mask != 0) & (response_mask != 1)).any()):
        bad = response_mask[(response_mask != 0) & (response_mask != 1)].flatten()[0].item()
        raise ValueError(f"response_mask must be binary (0/1 or bool), got a value {bad!r}")


def _sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    n = m.sum(-1)
    adv = torch.where(mask, advantages.float(), 0.0)
    seq = adv.sum(-1) / n.clamp(min=1.0)
    dev = torch.where(mask, (adv - seq[:, None]).abs(), 0.0).amax() if mask.any() else torch.zeros(())
    if float(dev) > 1e-5 * (1.0 + float(seq.abs().max())):
        raise ValueError("advantages: OPO needs one advantage per sequence, but verl's advantages vary "
                         f"over a sequence's valid tokens (max deviation {float(dev):.3g}); use an outcome "
                         "estimator (grpo, rloo, ...) rather than a token-level one (gae)")
    return seq


def _scale(config, loss_agg_mode: str, mask: torch.Tensor) -> tuple[float, bool]:
    """This call's share of verl's global mean (as verl's ``agg_loss``), and whether the call holds
    less than the whole batch (another rank or micro-batch holds the rest)."""
    info = {} if config is None else (config.get("global_batch_info", None) or {})
    dp = info.get("dp_size", 1) or 1
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"global_batch_info['dp_size'] must be a positive int, got {dp!r}")
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    denom = info.get(key)
    local = mask.sum() if loss_agg_mode == "token-mean" else (mask.sum(-1) > 0).sum()
    if denom is None:
        if dp > 1:
            raise ValueError(f"global_batch_info: dp_size={dp} needs {key!r} for loss_agg_mode="
                             f"{loss_agg_mode!r} (as verl's agg_loss)")
        return 1.0, False
    denom = float(denom)
    if not denom > 0 or denom < float(local):
        raise ValueError(f"global_batch_info[{key!r}] must be > 0 and at least this call's count "
                         f"{int(local)}, got {info.get(key)!r}")
    return float(local) / denom * dp, dp > 1 or denom > float(local)


def _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights) -> torch.Tensor:
    """verl's (B, T) tensors: shapes, a binary mask, finite values where valid, weights >= 0. Returns
    the bool mask."""
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    shape = tuple(log_prob.shape)
    if len(shape) != 2:
        raise ValueError(f"log_prob must be (B, T), got {shape}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be (B, T) = {shape} like log_prob, got {tuple(t.shape)}")
    _check_mask(response_mask, shape)
    mask = response_mask.bool()
    if rollout_is_weights is not None:
        w = rollout_is_weights
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"rollout_is_weights must be a float tensor, got {getattr(w, 'dtype', type(w).__name__)}")
        if tuple(w.shape) != shape:
            raise ValueError(f"rollout_is_weights must be (B, T) = {shape}, got {tuple(w.shape)}")
        wv = w.detach()[mask]
        if not bool(torch.isfinite(wv).all()) or bool((wv < 0).any()):
            bad = wv[~torch.isfinite(wv) | (wv < 0)][0].item()
            raise ValueError(f"rollout_is_weights must be finite and >= 0 at valid tokens, got {bad!r}")
    return mask


def _vocab_size(config):
    """The registered vocab_size, else the actor model's (verl sets ``actor_config.model_config``)."""
    if _STATE["vocab_size"] is not None:
        return _STATE["vocab_size"]
    mc = None if config is None else getattr(config, "model_config", None)
    hf = getattr(mc, "hf_config", None)
    if hf is not None and hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    v = getattr(hf, "vocab_size", None)
    if v is None:
        raise ValueError("opo_group_softmax's adaptive τ needs the vocabulary size: register(vocab_size=V) "
                         "(or OPO_VERL_OPTIONS='{\"vocab_size\": V}'), or an actor config whose model_config "
                         "has hf_config.vocab_size (verl's workers set it)")
    return int(v)


def _compute(escort, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
             rollout_is_weights):
    if loss_agg_mode not in _AGG:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} has no OPO counterpart; use one of "
                         f"{sorted(_AGG)} ('seq-mean-token-mean' is the paper's loss)")
    mask = _check_inputs(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    adv_seq = _sequence_advantages(advantages, mask)
    scale, partial = _scale(config, loss_agg_mode, mask)
    extra = {}
    if escort == "group_softmax":
        if loss_agg_mode == "token-mean":
            raise ValueError("loss_agg_mode='token-mean': the group-softmax weighting is sequence level; "
                             "use 'seq-mean-token-mean'")
        opts = {k: v for k, v in OPTIONS.items() if k in _GROUP_SOFTMAX_OPTIONS}
        group = config.get("rollout_n", None) if config is not None else None
        opts.update(escort="group_softmax", group_size=int(group) if group else None)
        if opts.get("adaptive_tau", True):
            extra["vocab_size"] = _vocab_size(config)
    else:
        opts = dict({k: v for k, v in OPTIONS.items() if k in _PAPER_OPTIONS}, **_AGG[loss_agg_mode])
        if _STATE["omega"] == "estimator":
            # verl's advantages are ω over the whole training batch (adv_estimator=opo_escort)
            extra["omega"] = adv_seq
            opts = {k: v for k, v in opts.items() if k not in ESCORT_OPTIONS}
        elif partial and opts.get("norm_scope", "batch") == "batch":
            raise ValueError("the escort weights ω would be normalized over this micro-batch only (verl's "
                             "global_batch_info shows more sequences on other micro-batches or ranks): use "
                             f"algorithm.adv_estimator={ADV_ESTIMATOR} with omega='estimator' (ω over the whole "
                             "training batch), or one micro-batch per mini-batch on one rank")
    logp = log_prob
    metrics = {}
    if rollout_is_weights is not None:
        w = torch.where(mask, rollout_is_weights.detach().to(log_prob.dtype), 0.0)
        # the value stays the OPO loss; each token's gradient is multiplied by its weight
        logp = log_prob.detach() + w * (log_prob - log_prob.detach())
        metrics["actor/opo_is_weight_mean"] = float(w.sum() / mask.sum().clamp(min=1))
    loss, m = policy_loss(logp, old_log_prob.detach(), adv_seq, mask, loss="opo", **opts, **extra)
    with torch.no_grad():
        kl = torch.where(mask, old_log_prob.float() - log_prob.float(), 0.0).sum() / mask.sum().clamp(min=1)
    metrics.update({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": float(kl), "actor/pg_clipfrac_lower": 0.0})
    for k in ("delta_mean", "delta_abs_mean", "chi2", "omega_min", "omega_max", "omega_std"):
        if k in m:
            metrics[f"actor/opo_{k}"] = float(m[k])
    return loss * scale, metrics


def compute_policy_loss_opo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None):
    """verl policy loss ``"opo"``: opo's paper-mode OPO loss (``escort="paper"``), verl's signature.

    old_log_prob, log_prob, advantages, response_mask: (B, T); returns ``(pg_loss, pg_metrics)``.
    See the module docstring for the ``loss_agg_mode`` mapping and the rollout-correction weights.
    """
    return _compute("paper", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights)


def compute_policy_loss_opo_group_softmax(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                          advantages: torch.Tensor, response_mask: torch.Tensor,
                                          loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                          rollout_is_weights: torch.Tensor | None = None):
    """verl policy loss ``"opo_group_softmax"``: the authors' reference-code weighting
    (``escort="group_softmax"``, ``group_size = actor.rollout_n``), verl's signature."""
    return _compute("group_softmax", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                    config, rollout_is_weights)


_VLM_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")
_ORIGINAL_PATCH: list = []


def forward_with_opo_backend(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                             output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                             temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's ``forward_with_torch_backend`` with opo's ``linear_logprobs`` in place of ``FusedLinearForPPO``:
    returns verl's ``CausalLMOutputForPPO`` with ``log_probs`` and ``entropy`` (B, T) fp32."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model
    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values,
                                 inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    hidden_states = outputs[0]
    if not return_dict:
        raise NotImplementedError("forward_with_opo_backend has to return_dict")
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_opo_backend needs labels, shift_labels or input_ids")
    weight, bias = self.lm_head.weight, self.lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    # a sharded head (FSDP2 with an untied lm_head): gather it, differentiably (the gradient is
    # reduce-scattered back to the shards)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    # the model's own logit transform (Gemma-2's soft-capping, Cohere's / Granite's scaling)
    log_probs, entropy = linear_logprobs(hidden_states, weight.to(hidden_states.dtype), rolled,
                                         bias=bias, temperature=float(temperature), return_entropy=True,
                                         **head_transform(self.config.get_text_config()))
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
    original = _ORIGINAL_PATCH[0]
    if not use_fused_kernels or model.config.model_type in _VLM_TYPES:
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
    model._verl_fused_kernels_backend = "opo"
    model.__class__.forward = forward_with_opo_backend
    logger.info("Using opo_kernels.linear_logprobs for fused log-probs in %s", model.__class__.__name__)


def enable_logprob_hook() -> None:
    """Route verl's fused log-prob path (``use_fused_kernels=True``) to opo's ``linear_logprobs`` for dense
    text models, by replacing ``verl.models.transformers.monkey_patch.patch_forward_with_backends``."""
    from verl.models.transformers import monkey_patch
    if monkey_patch.patch_forward_with_backends is _patch_forward_with_backends:
        return
    _ORIGINAL_PATCH[:] = [monkey_patch.patch_forward_with_backends]
    monkey_patch.patch_forward_with_backends = _patch_forward_with_backends


def disable_logprob_hook() -> None:
    """Undo :func:`enable_logprob_hook` (models already patched keep their forward)."""
    from verl.models.transformers import monkey_patch
    if _ORIGINAL_PATCH and monkey_patch.patch_forward_with_backends is _patch_forward_with_backends:
        monkey_patch.patch_forward_with_backends = _ORIGINAL_PATCH.pop()


def _from_env() -> None:
    raw = os.environ.get("OPO_VERL_OPTIONS", "").strip()
    try:
        opts = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"OPO_VERL_OPTIONS is not a JSON object: {raw!r} ({e})") from e
    if not isinstance(opts, dict):
        raise ValueError(f"OPO_VERL_OPTIONS must be a JSON object, got {raw!r}")
    register(**opts)
    if os.environ.get("OPO_VERL_LOGPROBS", "").strip() not in ("", "0"):
        enable_logprob_hook()


_from_env()
