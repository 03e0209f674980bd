"""Public functions: the fused OPO loss, the baselines, and the log-prob primitive (SPEC §5).

Data flows one way: these functions validate, pick a backend (:mod:`opo_kernels.dispatch`) and
call the chunked path (:mod:`opo_kernels.chunked`), the fully fused Triton path
(:mod:`opo_kernels.fused_linear`) or the materializing reference. The loss math itself lives in
:mod:`opo_kernels.losses`.
"""
from __future__ import annotations

import torch

from . import checks
from .chunked import (FusedPolicyLossFunction, LinearLogprobsFunction, LossArgs, VocabArgs,
                      default_chunk_tokens, fused_loss, logprobs_forward, plan_chunks)
from .dispatch import resolve_backend
from .losses import LOSSES, LossOptions, finish_metrics, make_plan, plan_full_batch

__all__ = ["fused_policy_loss", "fused_opo_loss", "linear_logprobs", "policy_loss", "opo_loss",
           "LOSSES"]


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, run the head in the autocast dtype (the casts stay differentiable)."""
    dev = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device type autocast does not know: nothing to cast for
        enabled = False
    if enabled:
        dt = torch.get_autocast_dtype(dev)
        hidden = hidden.to(dt)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(dt)
        if isinstance(bias, torch.Tensor):
            bias = bias.to(dt)
    return hidden, weight, bias


def _masked_old(old_logps, m):
    """(N,) fp32 anchor log-probs, 0 at masked positions (whatever they held: NaN·0 is NaN)."""
    if old_logps is None:
        return None
    return torch.where(m > 0, old_logps.reshape(-1).float(), 0.0)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _vocab_args(temperature, ignore_index, backend, device, V, lengths, chunk_size,
                filter_eps=None, deterministic=False) -> VocabArgs:
    checks.check_scalar_positive("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    be = resolve_backend(backend, device)
    chunk = chunk_size or default_chunk_tokens(V, device)
    if filter_eps is not None:
        if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or filter_eps < 0:
            raise ValueError(f"filter_eps must be a number >= 0 or None, got {filter_eps!r}")
    return VocabArgs(float(temperature), ignore_index, be, chunk, plan_chunks(lengths, chunk),
                     filter_eps, bool(deterministic))


def _reference_logprobs(h2, weight, bias, targets, temperature):
    """Materializing fp32 log-probs and entropy with plain autograd (the ``reference`` backend)."""
    z = h2.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    lsm = torch.log_softmax(z / temperature, dim=-1)
    V = z.shape[-1]
    ok = (targets >= 0) & (targets < V)
    logp = lsm.gather(-1, torch.where(ok, targets, 0).unsqueeze(-1)).squeeze(-1) * ok
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def _logprobs(h2, weight, bias, targets, va: VocabArgs, want_grad: bool):
    if va.backend == "reference":
        return _reference_logprobs(h2, weight, bias, targets, va.temperature)
    if want_grad:
        return LinearLogprobsFunction.apply(h2, weight, bias, targets, va)
    logp, _, ent = logprobs_forward(h2, weight, bias, targets, va)
    return logp, ent


@torch.compiler.disable
def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                    ignore_index=-100, backend="auto", chunk_size=None, seq_ids=None,
                    cu_seqlens=None, filter_eps=None, deterministic=False):
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden: (B, T, H) or (N, H), fp32/bf16/fp16. weight: (V, H), same dtype. targets: (B, T) or
    (N,) int64; positions equal to ``ignore_index`` get log-prob 0. Returns fp32 log-probs shaped
    like ``targets`` — and the token entropy (same shape, fp32) with ``return_entropy=True`` —
    differentiable w.r.t. hidden, weight and bias. Under ``torch.no_grad()`` (anchor and
    reference passes) no backward state is built. Logits exist one chunk at a time.
    ``seq_ids``/``cu_seqlens`` (packed inputs) only align the chunks with sequences, which makes
    the result bitwise equal to the log-probs inside :func:`fused_policy_loss` on the same data.
    ``filter_eps`` / ``deterministic``: options of ``backend="fused"`` (gradient filtering
    threshold, 0 = exact; atomics-free backward), see :mod:`opo_kernels.fused_linear`.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    checks.check_linear(hidden, weight, bias, targets)
    V, H = weight.shape
    lay = checks.layout(targets, None, seq_ids, cu_seqlens)
    va = _vocab_args(temperature, ignore_index, backend, hidden.device, V, lay.lengths, chunk_size,
                     filter_eps, deterministic)
    tg = targets.reshape(-1)
    bad = ((tg != ignore_index) & ((tg < 0) | (tg >= V)))
    if bad.any():
        raise ValueError(f"targets must be in [0, V={V}) or equal ignore_index={ignore_index}, "
                         f"got e.g. {tg[bad][:5].tolist()}")
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = _logprobs(hidden.reshape(-1, H), weight, bias, tg, va,
                              _needs_grad(hidden, weight, bias))
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, ent.view(targets.shape)
    return logp


def _options(loss, kw, lay) -> LossOptions:
    o = LossOptions(loss=loss, **kw)
    checks.check_options(o)
    if o.loss == "dr_grpo" and o.max_completion_length is None:
        mcl = lay.T if lay.T is not None else max(lay.lengths, default=1)
        o = LossOptions(**{**o.__dict__, "max_completion_length": max(1, mcl)})
    if o.norm_scope == "group" or o.escort == "group_softmax":
        if o.group_size is None or lay.B % o.group_size:
            raise ValueError(f"norm_scope='group' / escort='group_softmax' need a group_size that "
                             f"divides the number of sequences B={lay.B}, got group_size={o.group_size!r}")
    return o


@torch.compiler.disable
def fused_policy_loss(hidden, weight, targets, advantages, old_logps=None, mask=None, *,
                      loss="opo", bias=None, alpha=0.4, mu=1.0, tau=1.0, level="sequence",
                      seq_reduce="mean", ratio="log", normalize="zscore", norm_scope="batch",
                      group_size=None, ref_correction=False, max_log_ratio=None, temperature=1.0,
                      ignore_index=-100, escort="paper", clip_eps_low=None, clip_eps_high=None,
                      max_completion_length=None, beta_r=0.15, adaptive_tau=True,
                      process_group=None, backend="auto", seq_ids=None, cu_seqlens=None,
                      chunk_size=None, filter_eps=None, deterministic=False):
    """A policy loss fused with the LM head: ``loss="opo"`` (default) or a baseline of SPEC §4.

    Args:
        hidden: (B, T, H) or packed (N, H), fp32/bf16/fp16 — states whose next token is ``targets``.
        weight: (V, H) LM-head weight, dtype of ``hidden``. ``bias``: (V,) or None.
        targets: (B, T) or (N,) int64.
        advantages: (B,) float, one per sequence (packed: one per ``cu_seqlens``/``seq_ids`` sequence).
        old_logps: like ``targets``, float — anchor log-probs; None = on-policy (Δ = 0 exactly).
        mask: like ``targets``, bool or 0/1; None = valid wherever ``targets != ignore_index``.
        loss: one of ``LOSSES``; the OPO options follow SPEC §2–§3, the clip ε SPEC §4.
        backend: "auto" | "triton" | "native" | "torch" | "fused" | "reference".
        chunk_size: tokens per logits chunk (default from V: ≤ 64 MiB of fp32 logits on CPU,
            512 MiB on GPU).
        filter_eps, deterministic: ``backend="fused"`` only — skip gradient tiles whose |dz| is
            below the threshold (None = bf16-resolution default, 0 = exact); atomics-free backward.

    Returns ``(loss, metrics)``: an fp32 scalar, differentiable w.r.t. hidden, weight and bias,
    and a dict of detached fp32 scalars (entropy, delta_mean, delta_abs_mean, chi2, omega_min,
    omega_max, omega_std, num_tokens, num_seqs, and clip_frac for the clipped baselines).

    Design: for losses whose gradient per sequence needs only that sequence's tokens and
    batch constants fixed before the pass (paper-mode OPO, GSPO, the PPO-clip family), chunks hold
    whole sequences and the forward computes loss and gradients in one pass over the logits
    (three GEMMs). ``escort="group_softmax"``, ``ref_correction`` with an on-policy anchor, and
    the ``fused``/``reference`` backends take two phases: log-probs first (keeping per-token
    lse), the loss on them, then a backward that recomputes the logits.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    checks.check_linear(hidden, weight, bias, targets)
    checks.check_loss_tensors(advantages, old_logps, targets)
    lay = checks.layout(targets, advantages.shape[0], seq_ids, cu_seqlens)
    opts = _options(loss, dict(alpha=alpha, mu=mu, tau=tau, level=level, seq_reduce=seq_reduce,
                               ratio=ratio, normalize=normalize, norm_scope=norm_scope,
                               group_size=group_size, ref_correction=ref_correction,
                               max_log_ratio=max_log_ratio, escort=escort, clip_eps_low=clip_eps_low,
                               clip_eps_high=clip_eps_high, max_completion_length=max_completion_length,
                               beta_r=beta_r, adaptive_tau=adaptive_tau), lay)
    V, H = weight.shape
    va = _vocab_args(temperature, ignore_index, backend, hidden.device, V, lay.lengths, chunk_size,
                     filter_eps, deterministic)
    tg = targets.reshape(-1)
    m = checks.valid_mask(targets, mask, ignore_index)
    checks.check_values(tg, V, m, advantages, old_logps, lay)
    old = _masked_old(old_logps, m)
    plan = make_plan(opts, advantages, m, lay.lengths_t, old, V, process_group)
    h2 = hidden.reshape(-1, H)
    want_grad = _needs_grad(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        if va.backend in ("reference", "fused") or plan.needs_full_batch:
            logp, ent = _logprobs(h2, weight, bias, tg, va, want_grad)
            plan_full_batch(plan, logp, m, process_group)
            out, sums = plan.chunk_loss(logp, old, m, lay.seq, 0, lay.B)
            ent_sum = (ent.detach() * m).sum()
        else:
            la = LossArgs(va=va, plan=plan, targets=tg, mask=m, seq=lay.seq, old=old)
            if want_grad:
                out, sums, ent_sum = FusedPolicyLossFunction.apply(h2, weight, bias, la)
            else:
                out, sums, ent_sum, *_ = fused_loss(h2, weight, bias, la, False, False, False)
    return out, finish_metrics(plan, sums.detach(), ent_sum.detach())


def fused_opo_loss(hidden, weight, targets, advantages, old_logps=None, mask=None, **kwargs):
    """The OPO loss fused with the LM head: :func:`fused_policy_loss` with ``loss="opo"``.

    Per sequence ``−ω·v + (μ/2)·v²`` with Δ the (length-averaged) log-ratio to the anchor,
    v = Δ (``ratio="log"``) or e^Δ − 1 (``"exact"``), ω the normalized escort weights
    ``exp((1 − α)A/τ)`` (SPEC §2). Shapes and options as :func:`fused_policy_loss`.
    """
    if "loss" in kwargs:
        raise TypeError("fused_opo_loss() got an unexpected keyword argument 'loss' "
                        "(use fused_policy_loss to choose a loss)")
    return fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask, loss="opo", **kwargs)


def policy_loss(logps, old_logps, advantages, mask=None, *, loss="opo", entropy=None,
                vocab_size=None, seq_ids=None, cu_seqlens=None, process_group=None, **options):
    """The same losses from per-token log-probs (for trainers that already have them).

    logps: (B, T) or (N,) float, differentiable (autograd flows through). old_logps: like
    ``logps`` or None (on-policy). advantages: (B,). mask: like ``logps``, bool or 0/1; None = all
    valid. entropy: optional per-token entropy (like ``logps``) for the metrics. vocab_size: needed
    by ``escort="group_softmax"`` with adaptive τ. Other options as :func:`fused_policy_loss`.
    Returns ``(loss, metrics)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"logps must be a float tensor, got {getattr(logps, 'dtype', type(logps).__name__)}")
    if logps.dim() not in (1, 2):
        raise ValueError(f"logps must be (B, T) or (N,), got {tuple(logps.shape)}")
    checks.check_loss_tensors(advantages, old_logps, logps)
    lay = checks.layout(logps, advantages.shape[0], seq_ids, cu_seqlens)
    unknown = set(options) - set(LossOptions.__dataclass_fields__) - {"loss"}
    if unknown:
        raise TypeError(f"policy_loss() got unexpected keyword arguments {sorted(unknown)}")
    opts = _options(loss, options, lay)
    if opts.escort == "group_softmax" and opts.adaptive_tau and vocab_size is None:
        raise ValueError("escort='group_softmax' with adaptive_tau needs vocab_size (for H / log V)")
    m = torch.ones(logps.numel(), dtype=torch.float32, device=logps.device) if mask is None else \
        checks.valid_mask(torch.zeros_like(logps, dtype=torch.int64), mask, -1)
    lp = logps.reshape(-1).float()
    if not torch.isfinite(lp[m > 0]).all():
        raise ValueError("logps must be finite at valid positions, got NaN/inf")
    checks.check_values(torch.zeros_like(lp, dtype=torch.int64), 1, m, advantages, old_logps, lay)
    old = _masked_old(old_logps, m)
    plan = make_plan(opts, advantages, m, lay.lengths_t, old, vocab_size or 1, process_group)
    plan_full_batch(plan, lp, m, process_group)
    out, sums = plan.chunk_loss(lp, old, m, lay.seq, 0, lay.B)
    ent_sum = torch.zeros((), device=lp.device) if entropy is None else \
        (entropy.reshape(-1).detach().float() * m).sum()
    metrics = finish_metrics(plan, sums.detach(), ent_sum)
    if entropy is None:
        metrics.pop("entropy")
    return out, metrics


def opo_loss(logps, old_logps, advantages, mask=None, **options):
    """The OPO loss from per-token log-probs: :func:`policy_loss` with ``loss="opo"``."""
    if "loss" in options:
        raise TypeError("opo_loss() got an unexpected keyword argument 'loss'")
    return policy_loss(logps, old_logps, advantages, mask, loss="opo", **options)
