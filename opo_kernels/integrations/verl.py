"""opo's OPO loss in verl (>= 0.9.1): ``"opo"`` and ``"opo_group_softmax"`` in verl's policy-loss registry.

Turn it on in a verl run with two overrides (the module registers itself when imported, in every
worker process)::

    actor_rollout_ref.model.external_lib=opo_kernels.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=opo            # or opo_group_softmax
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean    # paper mode (see below)

(``VERL_USE_EXTERNAL_MODULES=opo_kernels.integrations.verl`` in the environment does the same.)
OPO's options (``alpha``, ``mu``, ``tau``, ``ratio``, ``normalize``, ``norm_scope``,
``max_log_ratio``, ``ref_correction``, ``beta_r``, ``adaptive_tau``, and ``vocab_size`` for the
group-softmax mode's adaptive τ) come from ``register(**options)`` or, at import, from the JSON
object in the environment variable ``OPO_VERL_OPTIONS`` (e.g. ``'{"alpha": 0.4, "mu": 1.0}'``).

``loss_agg_mode`` → opo's aggregation:

- ``"seq-mean-token-mean"``: ``level="sequence", seq_reduce="mean"`` — the paper's loss (Δ the
  length-averaged sequence log-ratio, mean over sequences). Recommended.
- ``"seq-mean-token-sum"``: ``level="sequence", seq_reduce="sum"`` (Δ the summed log-ratio).
- ``"token-mean"`` (verl's default): ``level="token"`` — per-token Δ, token mean over the batch.
- ``"token-sum"`` and ``"seq-mean-token-sum-norm"``: no OPO counterpart → ``ValueError``.

verl's ``global_batch_info`` (``dp_size``, ``global_batch_size``, ``batch_num_tokens``) scales the
returned loss to this call's share of the global mean, exactly as verl's ``agg_loss`` scales its own
losses. The escort weights ω are normalized over the sequences of each call (one micro-batch on
one rank), not over the whole mini-batch: a fixed ω across micro-batches needs the ``omega=``
argument of issue 9. ``"opo_group_softmax"`` takes ``group_size = actor.rollout_n``; each call
must hold whole prompt groups (``ppo_micro_batch_size_per_gpu`` a multiple of ``rollout_n``, no
``use_dynamic_bsz``).

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
``linear_logprobs(hidden, lm_head.weight, targets, temperature=T, return_entropy=True)``.
Vision-language models keep verl's own forward. The entropy it returns is differentiable: its
gradient ∂H/∂z = −p ⊙ (log p + H) is formed in opo's vocabulary pass, so verl's ``entropy_coeff``
works through the hook.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from . import require

_verl = require("verl", "0.9.1", "verl")
from verl.trainer.ppo import core_algos  # noqa: E402

from opo_kernels import linear_logprobs, policy_loss  # noqa: E402

__all__ = ["register", "enable_logprob_hook", "disable_logprob_hook", "forward_with_opo_backend", "compute_policy_loss_opo", "compute_policy_loss_opo_group_softmax", "OPTIONS"]

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
_VOCAB_SIZE: list = [None]
_warned: set = set()


def register(*, vocab_size: int | None = None, **options) -> None:
    """Register ``"opo"`` and ``"opo_group_softmax"`` in verl's policy-loss registry with these OPO
    options (checked here: a bad name or value raises ``ValueError``/``TypeError`` naming it)."""
    for k in options:
        if k in _RESERVED:
            raise ValueError(f"option {k!r} is set by {_RESERVED[k]} in verl, not by register()")
    # validate once, on a tiny batch, for both weightings
    z = torch.zeros(2, 1)
    policy_loss(z, z, torch.zeros(2), loss="opo", **options)
    gs_opts = {k: v for k, v in options.items() if k not in ("ratio", "normalize", "norm_scope",
                                                             "ref_correction", "max_log_ratio")}
    policy_loss(z, z, torch.zeros(2), loss="opo", escort="group_softmax", group_size=2,
                vocab_size=vocab_size or 2, **gs_opts)
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 2):
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    OPTIONS.clear()
    OPTIONS.update(options)
    _VOCAB_SIZE[0] = vocab_size
    core_algos.register_policy_loss("opo")(compute_policy_loss_opo)
    core_algos.register_policy_loss("opo_group_softmax")(compute_policy_loss_opo_group_softmax)


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


def _scale(config, loss_agg_mode: str, mask: torch.Tensor) -> float:
    info = {} if config is None else (config.get("global_batch_info", None) or {})
    dp = int(info.get("dp_size", 1) or 1)
    if loss_agg_mode == "token-mean":
        denom, local = info.get("batch_num_tokens"), mask.sum()
    else:
        denom, local = info.get("global_batch_size"), (mask.sum(-1) > 0).sum()
    if denom is None:
        if dp > 1:
            raise ValueError(f"global_batch_info: dp_size={dp} needs the global batch size / token "
                             f"count for loss_agg_mode={loss_agg_mode!r} (as verl's agg_loss)")
        return 1.0
    return float(local) / float(denom) * dp


def _compute(escort, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
             rollout_is_weights):
    if loss_agg_mode not in _AGG:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} has no OPO counterpart; use one of "
                         f"{sorted(_AGG)} ('seq-mean-token-mean' is the paper's loss)")
    mask = response_mask.bool()
    adv_seq = _sequence_advantages(advantages, mask)
    opts = dict(OPTIONS, **_AGG[loss_agg_mode])
    extra = {}
    if escort == "group_softmax":
        if loss_agg_mode == "token-mean":
            raise ValueError("loss_agg_mode='token-mean': the group-softmax weighting is sequence level; "
                             "use 'seq-mean-token-mean'")
        opts.pop("level")
        opts.pop("seq_reduce")
        group = config.get("rollout_n", None) if config is not None else None
        opts.update(escort="group_softmax", group_size=int(group) if group else None)
        extra["vocab_size"] = _VOCAB_SIZE[0]
    logp = log_prob
    metrics = {}
    if rollout_is_weights is not None:
        w = torch.where(mask, rollout_is_weights.detach().to(log_prob.dtype), 0.0)
        # the value stays the OPO loss; each token's gradient is multiplied by its weight
        logp = log_prob.detach() + w * (log_prob - log_prob.detach())
        metrics["actor/opo_is_weight_mean"] = float(w.sum() / mask.sum().clamp(min=1))
    loss, m = policy_loss(logp, old_log_prob.detach(), adv_seq, mask, loss="opo", **opts, **extra)
    scale = _scale(config, loss_agg_mode, mask)
    if scale != 1.0 and escort != "group_softmax" and "omega" not in _warned:
        _warned.add("omega")
        logger.warning("opo in verl: the escort weights are normalized over each micro-batch (%d "
                       "sequences), not over the whole mini-batch (issue 9's omega= fixes this)",
                       int(mask.shape[0]))
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
    head = self.lm_head
    log_probs, entropy = linear_logprobs(hidden_states, head.weight.to(hidden_states.dtype), rolled,
                                         bias=head.bias, temperature=float(temperature), return_entropy=True)
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
