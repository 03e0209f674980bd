"""The public functions: the fused policy losses, the log-prob primitive, the losses on log-probs.

Each function validates its arguments once (:mod:`opo_kernels.checks`), takes masked positions
out (their hidden rows become zeros and their targets 0 before any GEMM, so whatever they held —
NaN included — reaches no loss, metric or gradient), asks :func:`opo_kernels.dispatch.get_backend`
for the backend, and runs either the backend's one-pass loss or the two-phase path (log-probs,
then the loss on them). The loss math lives in :mod:`opo_kernels.losses`; the contract in
``docs/contract.md``.
"""
from __future__ import annotations

import dataclasses

import torch

from . import checks
from .autograd import LinearLogprobs, OnePassLoss
from .chunked import LossArgs
from .dispatch import Needs, get_backend
from .losses import RLInputs, finish_metrics, make_plan, plan_full_batch, segment_sum
from .options import LOSSES, Agg, BackendOptions, LossOptions, split_options
from .vocab_parallel import local_head, resolve_shard, shard_backend

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


def _constant_logps(logps, m):
    """(N,) fp32 constant log-probs (an anchor: old, reference or rollout), 0 at masked positions
    (whatever they held: NaN·0 is NaN).

    They are constants of the loss: any autograd history they carry is cut here, so every backend
    and path gives the same gradient."""
    if logps is None:
        return None
    return torch.where(m > 0, logps.detach().reshape(-1).float(), 0.0)


def _rl_inputs(opts, targets, m, lay, given: RLInputs, dc):
    """The RL-term inputs as the caller gave them (contract: "RL terms"), checked (value rules
    added to ``dc``) and masked (masked positions: 0, whatever they held). Returns the function
    that, given ``dc.read()``'s list, gives the checked :class:`RLInputs`."""
    checks.check_completion_length(opts, m, lay.lengths_t, dc)
    counts = checks.check_rl_inputs(opts, targets, m > 0, lay.B, dc, omega=given.omega,
                                    ref_logps=given.ref, rollout_logps=given.rollout,
                                    num_items_in_batch=given.num_items,
                                    num_seqs_in_batch=given.num_seqs)
    if given.omega is not None:
        checks.check_omega_values(given.omega, segment_sum(m, lay.lengths_t) > 0, dc)

    def rl_inputs(res) -> RLInputs:
        ni, ns = counts(res)
        return RLInputs(omega=given.omega, ref=_constant_logps(given.ref, m),
                        rollout=_constant_logps(given.rollout, m), num_items=ni, num_seqs=ns)
    return rl_inputs


def _mask_rows(h2, tg, keep):
    """Masked positions leave the GEMMs: hidden rows of zeros, target 0 (differentiable: the
    gradient of a masked row is 0)."""
    return torch.where(keep[:, None], h2, 0.0), torch.where(keep, tg, 0)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _logprobs(be, h2, weight, bias, targets, want_grad: bool):
    if want_grad:
        return LinearLogprobs.apply(h2, weight, bias, targets, be)
    logp, _, ent = be.logprobs(h2, weight, bias, targets)
    return logp, ent


def _check_head(hidden, weight, bias, targets, bo: BackendOptions, ignore_index, vocab_parallel):
    """The head's tensors (local shards of a vocabulary-parallel head) and the backend options,
    checked, and the vocabulary-parallel group with this rank's rows (None when the head is whole)."""
    checks.check_tensor("hidden", hidden)
    hidden, weight, bias, *vp = local_head(hidden, weight, bias, vocab_parallel)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    checks.check_linear(hidden, weight, bias, targets)
    checks.check_backend_options(bo)
    checks.check_ignore_index(ignore_index)
    return hidden, weight, bias, vp


def _backend(bo: BackendOptions, h2, keep, weight, vp, lengths):
    """The backend for one call and the global vocabulary size; on a vocabulary shard, the
    backend wrapped so that the shards' statistics are combined per token."""
    be = get_backend(h2.device, bo, V=weight.shape[0], lengths=lengths)
    group, start, stop = vp
    if group is None:
        return be, weight.shape[0]
    shard = resolve_shard(h2, keep, weight, group, start, stop)
    return shard_backend(be, shard), shard.vocab_size


@torch.compiler.disable
def linear_logprobs(hidden, weight, targets, *, bias=None, return_entropy=False, ignore_index=-100,
                    seq_ids=None, cu_seqlens=None, vocab_parallel=None, **backend_options):
    """Log-probs of ``targets`` under ``softmax(s)``, ``s = (hidden @ weight.T + bias) / temperature``.

    ``logit_scale`` (finite > 0) multiplies the logits and ``softcap`` (None or finite > 0) caps
    them, as Cohere's and Gemma-2's heads do: ``s = softcap·tanh(logit_scale·z / softcap) /
    temperature``, or ``s = logit_scale·z / temperature`` without softcap (z = hidden @ weight.T
    + bias). Log-probs, entropy and gradients are those of this distribution.

    hidden: (B, T, H) or (N, H), fp32/bf16/fp16. weight: (V, H), same dtype. targets: (B, T) or
    (N,) int64; positions equal to ``ignore_index`` get log-prob 0 and entropy 0, and take no
    part in any GEMM or gradient. Returns fp32 log-probs shaped like ``targets`` — and the token
    entropy (same shape, fp32) with ``return_entropy=True`` — differentiable w.r.t. hidden, weight
    and bias. Under ``torch.no_grad()`` (anchor and reference passes) no backward state is built.
    Logits exist one chunk at a time. ``seq_ids``/``cu_seqlens`` (packed inputs) only align the
    chunks with sequences. ``**backend_options``: ``temperature``, ``logit_scale``, ``softcap``
    (the transform above), ``backend``, ``chunk_size``
    (tokens per logits chunk, chunked backends), ``filter_eps`` / ``deterministic`` /
    ``accum_fp32`` (``backend="fused"`` only), as in :func:`fused_policy_loss`
    (:data:`opo_kernels.options.BACKEND_OPTIONS`). ``vocab_parallel``: a vocabulary-sharded head,
    as :func:`fused_policy_loss`.
    """
    _, bo = split_options("linear_logprobs", backend_options)
    hidden, weight, bias, vp = _check_head(hidden, weight, bias, targets, bo, ignore_index,
                                           vocab_parallel)
    H = weight.shape[1]
    lay = checks.layout(targets, None, seq_ids, cu_seqlens)
    tg = targets.reshape(-1)
    keep = tg != ignore_index
    h2 = hidden.reshape(-1, H)
    be, V = _backend(bo, h2, keep, weight, vp, lay.lengths)
    dc = checks.DeviceChecks(tg.device)
    masked = checks.check_targets(tg, V, keep, dc)
    any_masked = dc.read()[masked]  # the call's one host synchronization
    if any_masked:
        h2, tg = _mask_rows(h2, tg, keep)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = _logprobs(be, h2, weight, bias, tg, _needs_grad(hidden, weight, bias))
    if any_masked:
        logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, ent.view(targets.shape)
    return logp


def _options(o: LossOptions, lay) -> LossOptions:
    """The loss options of one call, validated (values, what the loss reads), with the default
    max_completion_length of a loss type that divides by it."""
    checks.check_options(o)
    checks.check_group_size(o.group_size, lay.B)
    if o.kind.aggregate is Agg.MAX_LENGTH and o.max_completion_length is None:
        mcl = lay.T if lay.T is not None else max(lay.lengths, default=1)
        o = dataclasses.replace(o, max_completion_length=max(1, mcl))
    return o


@torch.compiler.disable
def fused_policy_loss(hidden, weight, targets, advantages, old_logps=None, mask=None, *,
                      loss="opo", bias=None, ignore_index=-100, process_group=None, seq_ids=None,
                      cu_seqlens=None, omega=None, ref_logps=None, rollout_logps=None,
                      num_items_in_batch=None, num_seqs_in_batch=None, vocab_parallel=None,
                      **options):
    """A policy loss fused with the LM head: ``loss="opo"`` (default) or a baseline.

    Args:
        hidden: (B, T, H) or packed (N, H), fp32/bf16/fp16 — states whose next token is ``targets``.
        weight: (V, H) LM-head weight, dtype of ``hidden``. ``bias``: (V,) or None.
        targets: (B, T) or (N,) int64.
        advantages: (B,) float, one per sequence (packed: one per ``cu_seqlens``/``seq_ids`` sequence).
        old_logps: like ``targets``, float — anchor log-probs (≤ 0; a constant: any autograd
            history is cut); None = on-policy (Δ = 0 exactly).
        mask: like ``targets``, bool or 0/1; None = valid wherever ``targets != ignore_index``.
            Masked positions take part in nothing, whatever their hidden state holds.
        loss: one of ``LOSSES``.
        **options: the loss options and the backend options, declared in
            :mod:`opo_kernels.options` (``LOSS_OPTIONS``, ``BACKEND_OPTIONS``; the table in
            ``docs/contract.md``, "Options"). An option the chosen loss type (backend) does not
            read must keep its default (else ValueError).
        omega: (B,) fixed escort weights (paper-mode OPO), e.g. ``escort_weights`` over the whole
            generation batch, so that micro-batches share them.
        ref_logps: like ``targets`` — the reference model's log-probs (KL term, ``beta``).
        rollout_logps: like ``targets`` — the rollout engine's log-probs of the sampled tokens
            (mismatch metrics; importance weights with ``is_correction``).
        num_items_in_batch, num_seqs_in_batch: the whole batch's valid-token / sequence counts,
            the denominators of the token / sequence means (gradient accumulation); each only
            for a loss that divides by it (:func:`opo_kernels.options.counts_read`), else
            ValueError.
        Backend options: ``backend``: "auto" | "triton" | "native" | "torch" | "fused" |
        "reference"; ``temperature``, ``logit_scale``, ``softcap``: the logits the policy samples
        from, ``s = softcap·tanh(logit_scale·z / softcap) / temperature`` (``logit_scale·z /
        temperature`` with ``softcap=None``), z = hidden @ weight.T + bias; ``chunk_size``: tokens
        per logits chunk (chunked backends; default from V).
        ``filter_eps``, ``deterministic``, ``accum_fp32``: ``backend="fused"`` only. ``filter_eps``: gradient
            filtering threshold (None or 0: exact, the default; ε > 0 bounds the gradient mass
            each token loses by ε times its gradient scale); the backward is atomics-free and
            bitwise reproducible whatever ``deterministic`` says; ``accum_fp32=False``: dweight
            accumulates in its own dtype, so the backward holds no V × H fp32 buffer (see
            :mod:`opo_kernels.fused_linear`).
        vocab_parallel: the head split along the vocabulary over a process group (tensor
            parallelism): ``weight`` (and ``bias``) are this rank's rows and
            ``vocab_parallel=VocabParallel(group, start, stop)`` names the group and the rows
            (start/stop None: the shards tile [0, V) in rank order). A DTensor weight sharded
            ``Shard(0)`` over a mesh dimension needs no argument. Every rank of the group passes
            the same hidden states and global targets; the log-prob statistics are combined with
            two small all-reduces per chunk of logits (5 floats per token), the hidden-state gradient is
            summed over the group, the weight gradient stays local (docs/contract.md,
            "Vocabulary-parallel head").

    Returns ``(loss, metrics)``: an fp32 scalar, differentiable w.r.t. hidden, weight and bias,
    and a dict of detached fp32 scalars (entropy, delta_mean, delta_abs_mean, chi2, omega_min,
    omega_max, omega_std, num_tokens, num_seqs, and clip_frac for the clipped baselines).

    Paper-mode OPO, GSPO and the PPO-clip family run in one pass over the logits on the chunked
    backends (loss and gradients together, the KL, importance weights and entropy bonus
    included); ``escort="group_softmax"``, ``ref_correction`` with an on-policy anchor,
    ``top_entropy_quantile < 1`` and the ``fused``/``reference`` backends take two phases.
    """
    lo, bo = split_options("fused_policy_loss", options, loss=loss)
    hidden, weight, bias, vp = _check_head(hidden, weight, bias, targets, bo, ignore_index,
                                           vocab_parallel)
    checks.check_loss_tensors(advantages, old_logps, targets)
    checks.check_process_group(process_group)
    lay = checks.layout(targets, advantages.shape[0], seq_ids, cu_seqlens)
    opts = _options(lo, lay)
    H = weight.shape[1]
    tg = targets.reshape(-1)
    dc = checks.DeviceChecks(tg.device)
    m = checks.valid_mask(targets, mask, ignore_index, dc)
    h2 = hidden.reshape(-1, H)
    be, V = _backend(bo, h2, m > 0, weight, vp, lay.lengths)
    masked = checks.check_values(tg, V, m, advantages, old_logps, lay, dc)
    rl_inputs = _rl_inputs(opts, targets, m, lay, RLInputs(omega, ref_logps, rollout_logps,
                                                           num_items_in_batch, num_seqs_in_batch), dc)
    res = dc.read()  # every value rule at once: the call's one host synchronization
    if res[masked]:
        h2, tg = _mask_rows(h2, tg, m > 0)
    old = _constant_logps(old_logps, m)
    plan = make_plan(opts, advantages, m, lay.lengths_t, old, V, process_group, rl_inputs(res))
    want_grad = _needs_grad(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        if be.one_pass and not plan.needs_full_batch:
            la = LossArgs(plan=plan, targets=tg, mask=m, seq=lay.seq, old=old)
            if want_grad:
                out, sums, ent_sum = OnePassLoss.apply(h2, weight, bias, be, la)
            else:
                out, sums, ent_sum, *_ = be.one_pass_loss(h2, weight, bias, la, Needs(False, False, False))
        else:
            logp, ent = _logprobs(be, h2, weight, bias, tg, want_grad)
            plan_full_batch(plan, logp, m, process_group, ent)
            out, sums = plan.chunk_loss(logp, old, m, lay.seq, 0, lay.B, 0, ent)
            ent_sum = (ent.detach() * m).sum()
    return out, finish_metrics(plan, sums.detach(), ent_sum.detach())


def fused_opo_loss(hidden, weight, targets, advantages, old_logps=None, mask=None, **kwargs):
    """The OPO loss fused with the LM head: :func:`fused_policy_loss` with ``loss="opo"``.

    Per sequence ``−ω·v + (μ/2)·v²`` with Δ the (length-averaged) log-ratio to the anchor,
    v = Δ (``ratio="log"``) or e^Δ − 1 (``"exact"``), ω the normalized escort weights
    ``exp((1 − α)A/τ)``. Shapes and options as :func:`fused_policy_loss`.
    """
    if "loss" in kwargs:
        raise TypeError("fused_opo_loss() got an unexpected keyword argument 'loss' "
                        "(use fused_policy_loss to choose a loss)")
    return fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask, loss="opo", **kwargs)


def policy_loss(logps, old_logps, advantages, mask=None, *, loss="opo", entropy=None,
                vocab_size=None, seq_ids=None, cu_seqlens=None, process_group=None, omega=None,
                ref_logps=None, rollout_logps=None, num_items_in_batch=None,
                num_seqs_in_batch=None, **options):
    """The same losses from per-token log-probs (for trainers that already have them).

    logps: (B, T) or (N,) float, differentiable (autograd flows through). old_logps: like
    ``logps`` or None (on-policy). advantages: (B,). mask: like ``logps``, bool or 0/1; None = all
    valid; masked positions may hold anything. entropy: optional per-token entropy (like
    ``logps``) for the metrics. vocab_size: needed by ``escort="group_softmax"`` with adaptive τ.
    Options as :func:`fused_policy_loss`. Returns ``(loss, metrics)``.
    """
    checks.check_logps(logps)
    checks.check_loss_tensors(advantages, old_logps, logps)
    checks.check_process_group(process_group)
    lay = checks.layout(logps, advantages.shape[0], seq_ids, cu_seqlens)
    opts = _options(split_options("policy_loss", options, loss=loss, backend=False)[0], lay)
    if opts.escort == "group_softmax" and opts.adaptive_tau and vocab_size is None:
        raise ValueError("escort='group_softmax' with adaptive_tau needs vocab_size (for H / log V)")
    if entropy is None and (opts.entropy_coef > 0 or opts.top_entropy_quantile < 1.0):
        raise ValueError("entropy_coef > 0 and top_entropy_quantile < 1 need entropy (the per-token "
                         "entropies, like logps)")
    dc = checks.DeviceChecks(logps.device)
    m = torch.ones(logps.numel(), dtype=torch.float32, device=logps.device) if mask is None else \
        checks.valid_mask(torch.zeros_like(logps, dtype=torch.int64), mask, -1, dc)
    checks.add_logp_rules("logps", logps, m > 0, dc)
    lp = logps.reshape(-1).float()
    checks.check_values(torch.zeros_like(lp, dtype=torch.int64), 1, m, advantages, old_logps, lay, dc)
    rl_inputs = _rl_inputs(opts, logps, m, lay, RLInputs(omega, ref_logps, rollout_logps,
                                                         num_items_in_batch, num_seqs_in_batch), dc)
    if entropy is not None:
        checks.check_entropy_tensor(entropy, logps, m > 0, dc)
    res = dc.read()  # every value rule at once: the call's one host synchronization
    lp = torch.where(m > 0, lp, 0.0)  # masked positions may hold NaN: keep it out of every sum
    old = _constant_logps(old_logps, m)
    ent = None if entropy is None else torch.where(m > 0, entropy.reshape(-1).float(), 0.0)
    plan = make_plan(opts, advantages, m, lay.lengths_t, old, vocab_size or 1, process_group,
                     rl_inputs(res))
    plan_full_batch(plan, lp, m, process_group, ent)
    out, sums = plan.chunk_loss(lp, old, m, lay.seq, 0, lay.B, 0, ent)
    ent_sum = torch.zeros((), device=lp.device) if ent is None else ent.detach().sum()
    metrics = finish_metrics(plan, sums.detach(), ent_sum)
    if entropy is None:
        metrics.pop("entropy")
    return out, metrics


def opo_loss(logps, old_logps, advantages, mask=None, **options):
    """The OPO loss from per-token log-probs: :func:`policy_loss` with ``loss="opo"``."""
    if "loss" in options:
        raise TypeError("opo_loss() got an unexpected keyword argument 'loss'")
    return policy_loss(logps, old_logps, advantages, mask, loss="opo", **options)
