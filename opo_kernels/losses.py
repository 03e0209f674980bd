"""The policy losses, written on per-token log-probs (no vocabulary in sight).

Everything here works on the *packed* layout: ``N`` tokens in a row, ``seq`` (N,) int64 giving
each token's sequence in ``[0, B)`` (non-decreasing), ``mask`` (N,) fp32 0/1. The batch-global
quantities a loss needs (escort weights ω, sequence lengths, the denominators of every mean) are
computed once by :func:`make_plan`; :meth:`LossPlan.chunk_loss` then gives the loss contribution
of any run of whole sequences. Summing the contributions of consecutive chunks gives the loss of
the batch, which is what lets the fused path compute gradients one chunk of logits at a time.

The math: ``docs/contract.md`` ("The OPO loss", "Reference-code weighting", "Baselines").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checks
from .options import Agg, LossOptions

STD_EPS = 1e-6


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (N,) over consecutive segments of ``lengths`` (S,) -> (S,).

    ``segment_reduce`` walks each segment in order, so unlike ``index_add_`` on CUDA it is
    deterministic: the same inputs give the same bits.
    """
    if values.numel() == 0:
        return values.new_zeros(lengths.shape[0])
    return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)


# --------------------------------------------------------------------------------------------
# Advantages and escort weights
# --------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = STD_EPS) -> torch.Tensor:
    """Group-relative advantages (paper Algorithm 1 step 5).

    rewards: (B,) float, laid out group by group (``B % group_size == 0``).
    scale: ``"group"`` — (R − mean_G R) / (std_G R + eps), unbiased std;
    ``"batch"`` — (R − mean_G R) / (std_batch R + eps); ``"none"`` — R − mean_G R (Dr. GRPO).
    Returns (B,) fp32.
    """
    checks.check_rewards(rewards, group_size, scale)
    r = rewards.float()
    g = r.view(-1, group_size)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
        centered = centered / (std + eps)
    return centered.reshape(-1)


def _all_reduce(t: torch.Tensor, op, process_group) -> torch.Tensor:
    if process_group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op, group=process_group)
    return t


def escort_weights(advantages: torch.Tensor, *, alpha: float = 0.4, tau: float = 1.0,
                   normalize: str = "zscore", norm_scope: str = "batch",
                   group_size: int | None = None, anchor_seq_logps: torch.Tensor | None = None,
                   valid: torch.Tensor | None = None, process_group=None) -> torch.Tensor:
    """Escort weights ω (paper Eq. 7 with the batch normalization of docs/contract.md), no gradient.

    advantages: (B,) float, finite for valid sequences. anchor_seq_logps: (B,) anchor sequence
    log-probs ℓ for ``ref_correction`` (x −= (1−α)ℓ). valid: (B,) bool, sequences that take part
    (the rest get ω = 0 and are left out of every mean; they may hold anything). ``process_group``:
    with ``norm_scope="batch"`` the max, mean and std run over every rank of the group.
    Returns (B,) fp32.
    """
    checks.check_options(LossOptions(alpha=alpha, tau=tau, normalize=normalize,
                                     norm_scope=norm_scope, group_size=group_size))
    checks.check_escort_inputs(advantages, valid, anchor_seq_logps)
    checks.check_process_group(process_group)
    checks.check_group_size(group_size if norm_scope == "group" else None, advantages.shape[0])
    return _escort_weights(advantages, alpha, tau, normalize, norm_scope, group_size,
                           anchor_seq_logps, valid, process_group)


def _escort_weights(advantages, alpha, tau, normalize, norm_scope, group_size, anchor_seq_logps,
                    valid, process_group):
    a = advantages.detach().float()
    ok = torch.ones_like(a, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    x = (1.0 - alpha) * a / tau
    if anchor_seq_logps is not None:
        x = x - (1.0 - alpha) * anchor_seq_logps.detach().float()
    x = torch.where(ok, x, 0.0)  # left-out sequences may hold anything (NaN included)
    okf = ok.float()
    if norm_scope == "group":
        x = x.view(-1, group_size)
        okg = ok.view(-1, group_size)
        shift = torch.where(okg, x, torch.full_like(x, -math.inf)).amax(dim=1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        w = torch.exp(x - shift) * okg
        cnt = okg.sum(dim=1, keepdim=True).clamp_min(1)
        mean = w.sum(dim=1, keepdim=True) / cnt
        var = (((w - mean) * okg) ** 2).sum(dim=1, keepdim=True) / cnt
        om = _normalize(w, mean, var, normalize) * okg
        return om.reshape(-1)
    local_max = torch.where(ok, x, torch.full_like(x, -math.inf)).max() if x.numel() else x.new_tensor(-math.inf)
    shift = _all_reduce(local_max.clone().reshape(1), dist.ReduceOp.MAX, process_group)[0]
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    w = torch.exp(x - shift) * okf
    sums = _all_reduce(torch.stack([w.sum(), okf.sum()]), dist.ReduceOp.SUM, process_group)
    cnt = sums[1].clamp_min(1)
    mean = sums[0] / cnt
    sq = _all_reduce((((w - mean) * okf) ** 2).sum().reshape(1), dist.ReduceOp.SUM, process_group)[0]
    var = sq / cnt
    return _normalize(w, mean, var, normalize) * okf


def _normalize(w, mean, var, normalize):
    if normalize == "zscore":
        return (w - mean) / (var.sqrt() + STD_EPS)
    return w / mean.clamp_min(torch.finfo(torch.float32).tiny) - 1.0


# --------------------------------------------------------------------------------------------
# The plan: batch-global constants, then the loss of any run of whole sequences
# --------------------------------------------------------------------------------------------

# Layout of the metric partial sums every chunk returns (summed over chunks, except the last two:
# min and max). See :meth:`LossPlan.combine`.
N_SUMS = 12
(S_DELTA, S_ABS, S_V2, S_CLIP, S_KL, S_K1, S_K3, S_W, S_WN, S_WCUT, S_WMIN, S_WMAX) = range(N_SUMS)


def empty_sums(device) -> torch.Tensor:
    s = torch.zeros(N_SUMS, dtype=torch.float32, device=device)
    s[S_WMIN], s[S_WMAX] = math.inf, -math.inf
    return s


@dataclass(frozen=True)
class RLInputs:
    """The per-call tensors and counts of the RL terms (all optional): as the caller gave them
    (``omega``, ``ref_logps``, ``rollout_logps``, ``num_items_in_batch``, ``num_seqs_in_batch``),
    and, once the public function has checked them, masked and fp32 (what :func:`make_plan` takes).

    omega (B,): fixed escort weights. ref (N,): reference log-probs. rollout (N,): the rollout
    engine's log-probs. num_items (): global valid-token count; num_seqs (): global sequence count.
    """
    omega: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    rollout: torch.Tensor | None = None
    num_items: float | None = None
    num_seqs: float | None = None


@dataclass
class LossPlan:
    opts: LossOptions
    adv: torch.Tensor          # (B,) fp32
    seq_len: torch.Tensor      # (B,) fp32, valid tokens per sequence
    lengths: torch.Tensor      # (B,) int64, all tokens per sequence (segment lengths)
    omega: torch.Tensor | None  # (B,) fp32 (OPO paper mode)
    n_seqs: torch.Tensor       # () fp32, sequences with L > 0
    n_tokens: torch.Tensor     # () fp32, valid tokens
    vocab_size: int
    token_separable: bool      # the loss is a sum of per-token terms (metrics per token)
    needs_full_batch: bool     # the loss couples sequences through non-constant batch statistics
    tok_denom: torch.Tensor = None   # () token-mean denominator (num_items_in_batch or n_tokens)
    seq_denom: torch.Tensor = None   # () sequence-mean denominator (num_seqs_in_batch or n_seqs)
    dr_denom: float = 1.0            # dr_grpo: B (or num_seqs_in_batch) · max_completion_length
    ref: torch.Tensor | None = None       # (N,) fp32 reference log-probs (masked: 0)
    rollout: torch.Tensor | None = None   # (N,) fp32 rollout log-probs (masked: 0)
    ent_mask: torch.Tensor | None = None  # (N,) fp32 top_entropy_quantile mask (set by plan_full_batch)
    ent_denom: torch.Tensor = None        # () denominator of the entropy bonus
    global_items: bool = False            # num_items_in_batch given

    @property
    def wants_entropy(self) -> bool:
        """The loss depends on the token entropies (entropy_coef > 0): they need a gradient."""
        return self.opts.entropy_coef > 0

    @property
    def piece_separable(self) -> bool:
        """Every token's gradient is known once its own log-prob is: the loss of a piece of a
        sequence (``chunk_loss`` with ``lengths``) is its share of the sequence's loss."""
        o = self.opts
        return (self.token_separable and self.ent_mask is None
                and not (o.is_mode is not None and o.is_mode.per_sequence)
                and o.off_policy_mask_threshold is None)  # that mask reads the whole sequence

    @property
    def sequence_scaled(self) -> bool:
        """Within a sequence s, d(loss)/d logp_t = F_s · c_t with c_t = mask_t · (token
        importance weight) independent of the log-probs and F_s a function of the sequence's Δ_s
        alone (:meth:`token_coef`): paper-mode OPO at sequence level and GSPO, without a KL or
        entropy term (those add a per-token part of their own)."""
        o = self.opts
        return (o.kind.sequence_scaled and o.beta == 0 and o.entropy_coef == 0 and self.ent_mask is None
                and not self.needs_full_batch)

    def token_coef(self, old, mask, t0: int) -> torch.Tensor:
        """c_t (n,) fp32 of tokens ``[t0, t0 + n)`` for a :attr:`sequence_scaled` loss (up to a
        factor per sequence): the mask times the token importance weight, when there is one."""
        mode = self.opts.is_mode
        if mode is None or mode.per_sequence:
            return mask
        sums = empty_sums(mask.device)
        tw, _ = self._is_weights(old, mask, 0, 0, slice(t0, t0 + mask.shape[0]), sums)
        return mask * tw

    @staticmethod
    def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Partial sums of two chunks (sums, then min and max of the IS weights)."""
        return torch.cat([a[:S_WMIN] + b[:S_WMIN], torch.minimum(a[S_WMIN:S_WMIN + 1], b[S_WMIN:S_WMIN + 1]),
                          torch.maximum(a[S_WMAX:], b[S_WMAX:])])

    def chunk_loss(self, logp, old, mask, seq, s0: int, s1: int, t0: int = 0, ent=None,
                   lengths=None):
        """Loss contribution and metric partial sums of sequences ``[s0, s1)``.

        logp (n,) fp32 (differentiable), old (n,) fp32 or None (= on-policy, Δ = 0),
        mask (n,) fp32, seq (n,) int64 global sequence ids; the tokens are every token of
        sequences s0..s1-1, tokens ``[t0, t0 + n)`` of the batch. ``ent`` (n,) fp32 token
        entropies (differentiable; needed when :attr:`wants_entropy`). ``lengths`` (s1 − s0,)
        int64: the tokens of each sequence that are here, when only a piece of a sequence is
        (only for a :attr:`piece_separable` loss). Returns ``(loss, sums)``, ``sums`` a
        (N_SUMS,) fp32 tensor (see :meth:`combine`).
        """
        return self._chunk(logp, old, mask, seq, s0, s1, t0, ent, lengths, False)[:2]

    def chunk_grads(self, logp, old, mask, seq, s0: int, s1: int, t0: int = 0, ent=None,
                    lengths=None):
        """:meth:`chunk_loss` (same arguments) and its gradients in closed form, no autograd:
        ``(loss, sums, g_logp, g_ent)`` with g_logp (n,) fp32 d(loss)/d logp and g_ent (n,) fp32
        d(loss)/d entropy (None without an entropy term). No host synchronization (the one-pass
        path calls it once per chunk)."""
        with torch.no_grad():
            return self._chunk(logp.detach(), old, mask, seq, s0, s1, t0,
                               None if ent is None else ent.detach(), lengths, True)

    def _formula(self):
        """The policy-term formula of the loss; :data:`_GRADIENTS` holds its gradient."""
        formula = self.opts.kind.formula
        return _group_softmax_loss if formula == "group_softmax" else _POLICY_TERMS[formula]

    def _chunk(self, logp, old, mask, seq, s0, s1, t0, ent, lengths, grads: bool):
        """(loss, sums, g_logp, g_ent) of :meth:`chunk_loss`; the gradients None unless ``grads``."""
        if old is None:
            old = logp.detach()
        o = self.opts
        n = logp.shape[0]
        sl = slice(t0, t0 + n)
        sums = empty_sums(logp.device)
        tw, sw = self._is_weights(old, mask, s0, s1, sl, sums)
        if o.off_policy_mask_threshold is not None:
            keep = self._off_policy_keep(logp, old, mask, s0, s1, sl)
            sw = keep if sw is None else sw * keep
        if self.ent_mask is not None:
            em = self.ent_mask[sl]
            tw = em if tw is None else tw * em
        f = self._formula()
        # group_softmax reads no RL term (the options refuse them): no token or sequence weights
        args = (self, logp, old, mask, seq, s0, s1) + (() if f is _group_softmax_loss else (tw, sw))
        loss, s = f(*args)
        g_logp = _GRADIENTS[f](*args) if grads else None
        g_ent = None
        sums[:4] = s
        if self.ref is not None:
            kl_loss, kl_sum = _kl_term(self, logp, old, mask, seq, s0, s1, sl, lengths)
            sums[S_KL] = kl_sum
            if o.beta > 0:
                loss = loss + o.beta * kl_loss
                if grads:
                    g_logp = g_logp + o.beta * _kl_grad(self, logp, old, mask, seq, s0, s1, sl)
        if o.entropy_coef > 0:
            eff = mask if self.ent_mask is None else mask * self.ent_mask[sl]
            loss = loss - o.entropy_coef * (ent * eff).sum() / self.ent_denom
            if grads:
                g_ent = eff * -o.entropy_coef / self.ent_denom
        return loss, sums, g_logp, g_ent

    def _off_policy_keep(self, logp, old, mask, s0, s1, sl):
        """(s1 − s0,) 1.0 for the sequences that keep their policy term: advantage >= 0, or mean
        log(π_rollout / π_θ) over their valid tokens <= the threshold (π_rollout: the rollout
        log-probs when given, else the anchor)."""
        src = old if self.rollout is None else self.rollout[sl]
        kl = segment_sum((src - logp.detach()) * mask, self.lengths[s0:s1])
        avg = kl / self.seq_len[s0:s1].clamp_min(1)
        return ((self.adv[s0:s1] >= 0) | (avg <= self.opts.off_policy_mask_threshold)).float()

    def _is_weights(self, old, mask, s0, s1, sl, sums):
        """Detached rollout-mismatch weights: (token weights (n,) or None, sequence weights
        (s1 − s0,) or None); their metric sums go into ``sums``."""
        if self.rollout is None:
            return None, None
        mode = self.opts.is_mode
        o = self.opts
        roll = self.rollout[sl]
        d = (old.detach() - roll) * mask          # log(π_anchor / π_rollout) per valid token
        sums[S_K1] = (-d).sum()
        sums[S_K3] = ((torch.exp(d) - d - 1.0) * mask).sum()
        if mode is None:
            return None, None
        if mode.per_sequence:
            lr = segment_sum(d, self.lengths[s0:s1])
            ok = (self.seq_len[s0:s1] > 0).float()
        else:
            lr, ok = d, mask
        w = torch.exp(lr)
        lo = -math.inf if o.is_clip_min is None else o.is_clip_min
        hi = math.inf if o.is_clip_max is None else o.is_clip_max
        cut = ((w < lo) | (w > hi)).float() * ok
        if mode.truncate:
            w = torch.clamp(w, min=o.is_clip_min, max=o.is_clip_max)
        else:
            w = w.masked_fill(cut > 0, 0.0)
        w = w * ok
        okb = ok > 0
        sums[S_W] = w.sum()
        sums[S_WN] = ok.sum()
        sums[S_WCUT] = cut.sum()
        inf = w.new_full((1,), math.inf)  # no device sync: empty chunks keep (inf, -inf)
        sums[S_WMIN] = torch.cat([torch.where(okb, w, math.inf), inf]).min()
        sums[S_WMAX] = torch.cat([torch.where(okb, w, -math.inf), -inf]).max()
        if mode.per_sequence:
            return None, w
        return w, None


def make_plan(opts: LossOptions, advantages: torch.Tensor, mask: torch.Tensor,
              lengths: torch.Tensor, old: torch.Tensor | None, vocab_size: int,
              process_group=None, rl: RLInputs | None = None) -> LossPlan:
    """Batch-global constants. mask (N,) fp32, lengths (B,) int64 segment lengths, old (N,) or None."""
    ex = rl or RLInputs()
    kind = opts.kind
    seq_len = segment_sum(mask, lengths)
    valid = seq_len > 0
    # Sequences without valid tokens take part in nothing: whatever their advantage holds.
    advantages = torch.where(valid, advantages.detach().float(), 0.0)
    n_seqs = valid.sum().float()
    n_tokens = mask.sum()
    omega = None
    needs_full = False
    if kind.escort:
        if ex.omega is not None:
            omega = torch.where(valid, ex.omega.detach().float(), 0.0)
        else:
            anchor = None
            if opts.ref_correction:
                if old is None:
                    needs_full = True  # the anchor is the current policy: ℓ needs the log-probs first
                else:
                    anchor = _reduce_seq(segment_sum(old * mask, lengths), seq_len, opts.seq_reduce)
            if not needs_full:
                omega = _escort_weights(advantages, opts.alpha, opts.tau, opts.normalize,
                                        opts.norm_scope, opts.group_size, anchor, valid, process_group)
    if kind.needs_full_batch:
        needs_full = True
    if opts.top_entropy_quantile < 1.0:
        needs_full = True  # the entropy threshold is a quantile over the whole batch
    token_separable = kind.token_separable and opts.ratio_level == "token"
    dev = mask.device
    tok_denom = n_tokens.clamp_min(1) if ex.num_items is None else \
        torch.tensor(max(float(ex.num_items), 1.0), device=dev)
    seq_denom = n_seqs.clamp_min(1) if ex.num_seqs is None else \
        torch.tensor(max(float(ex.num_seqs), 1.0), device=dev)
    dr_denom = 1.0
    if kind.aggregate is Agg.MAX_LENGTH:
        nb = advantages.shape[0] if ex.num_seqs is None else max(float(ex.num_seqs), 1.0)
        dr_denom = float(nb * opts.max_completion_length)
    return LossPlan(opts=opts, adv=advantages.detach().float(), seq_len=seq_len, lengths=lengths,
                    omega=omega, n_seqs=n_seqs, n_tokens=n_tokens, vocab_size=vocab_size,
                    token_separable=token_separable, needs_full_batch=needs_full,
                    tok_denom=tok_denom, seq_denom=seq_denom, dr_denom=dr_denom, ref=ex.ref,
                    rollout=ex.rollout, ent_denom=tok_denom, global_items=ex.num_items is not None)


def plan_full_batch(plan: LossPlan, logp: torch.Tensor, mask: torch.Tensor,
                    process_group=None, ent: torch.Tensor | None = None) -> LossPlan:
    """Finish a plan that needed the current log-probs (ref_correction with on-policy anchor) or
    entropies (top_entropy_quantile)."""
    o = plan.opts
    if o.kind.escort and plan.omega is None:
        anchor = _reduce_seq(segment_sum(logp.detach() * mask, plan.lengths), plan.seq_len, o.seq_reduce)
        plan.omega = _escort_weights(plan.adv, o.alpha, o.tau, o.normalize, o.norm_scope,
                                     o.group_size, anchor, plan.seq_len > 0, process_group)
    if o.top_entropy_quantile < 1.0 and plan.ent_mask is None:
        e = ent.detach().float()
        ok = mask > 0
        if bool(ok.any()):
            thr = torch.quantile(e[ok], 1.0 - o.top_entropy_quantile)
            plan.ent_mask = ((e * mask >= thr) & ok).float()
        else:
            plan.ent_mask = torch.zeros_like(mask)
        if not plan.global_items:
            plan.ent_denom = plan.ent_mask.sum().clamp_min(1)
    return plan


def _reduce_seq(sums, seq_len, seq_reduce):
    if seq_reduce == "mean":
        return sums / seq_len.clamp_min(1)
    return sums


def _clamp_ratio(plan: LossPlan, delta):
    c = plan.opts.max_log_ratio
    return delta if c is None else torch.clamp(delta, -c, c)


def _weighted_tokens(x, tw):
    """``x`` (n,) with each token's gradient scaled by ``tw`` (value unchanged)."""
    if tw is None:
        return x
    return x.detach() + tw * (x - x.detach())


def _opo_loss(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    o = plan.opts
    # Token weights (IS token modes, top-entropy mask) scale each token's share of the gradient.
    d_tok = (_weighted_tokens(logp, tw) - old) * mask
    omega = plan.omega[s0:s1]
    if o.level == "sequence":
        lengths = plan.lengths[s0:s1]  # the chunk holds all their tokens
        L = plan.seq_len[s0:s1]
        delta = _reduce_seq(segment_sum(d_tok, lengths), L, o.seq_reduce)
        delta = _clamp_ratio(plan, delta)
        v = torch.expm1(delta) if o.ratio == "exact" else delta
        ok = (L > 0).float()
        term = (-omega * v + 0.5 * o.mu * v * v) * ok
        if sw is not None:
            term = term * sw
        loss = term.sum() / plan.seq_denom
        dd = delta.detach() * ok
        vv = v.detach() * ok
    else:
        delta = _clamp_ratio(plan, (logp - old) * mask)
        v = torch.expm1(delta) if o.ratio == "exact" else delta
        term = (-omega[seq - s0] * v + 0.5 * o.mu * v * v) * mask
        if tw is not None:
            term = term * tw
        if sw is not None:
            term = term * sw[seq - s0]
        loss = term.sum() / plan.tok_denom
        dd = delta.detach() * mask
        vv = v.detach() * mask
    sums = torch.stack([dd.sum(), dd.abs().sum(), (vv * vv).sum(), dd.new_zeros(())])
    return loss, sums


def _opo_slope(plan: LossPlan, raw, omega):
    """d(−ω·v + (μ/2)·v²)/dΔ at the unclamped log-ratio ``raw``: (−ω + μv)·v′(Δ), 0 where
    ``max_log_ratio`` clamps Δ (the clamp passes the gradient on its bounds, as torch.clamp)."""
    o = plan.opts
    delta = _clamp_ratio(plan, raw)
    v = torch.expm1(delta) if o.ratio == "exact" else delta
    g = o.mu * v - omega
    if o.ratio == "exact":
        g = g * (v + 1.0)  # d expm1(Δ)/dΔ = e^Δ = v + 1
    c = o.max_log_ratio
    if c is not None:
        g = torch.where((raw >= -c) & (raw <= c), g, 0.0)
    return g


def _opo_grad(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    """d(:func:`_opo_loss`)/d logp (n,) fp32: the slope of the sequence's (or token's) term in Δ
    times dΔ/d logp_t (mask · token weight, / L for a sequence mean)."""
    o = plan.opts
    if o.level == "sequence":
        L = plan.seq_len[s0:s1]
        raw = _reduce_seq(segment_sum((logp - old) * mask, plan.lengths[s0:s1]), L, o.seq_reduce)
        g = _opo_slope(plan, raw, plan.omega[s0:s1])
        div = L.clamp_min(1)[seq - s0] if o.seq_reduce == "mean" else None
        return _weighted(g[seq - s0], mask, tw, None if sw is None else sw[seq - s0], div,
                         plan.seq_denom)
    g = _opo_slope(plan, (logp - old) * mask, plan.omega[seq])
    return _weighted(g, mask, tw, None if sw is None else sw[seq - s0], None, plan.tok_denom)


def _clip_terms(plan: LossPlan, lr, adv_tok, mask):
    """Per-token policy terms (n,) of the clipped family and sapo, and the clipped-token count.

    lr (n,): the token's log-ratio (differentiable). The ratio e^lr may be past fp32's range
    (lr > 88.7 for a stale anchor): a token whose term is constant there (clipped, dual-clipped,
    A = 0, or sapo's saturated sigmoid) takes its constant value and no gradient, instead of
    0 · ∞ = NaN; the others are the formula on e^lr.
    """
    o = plan.opts
    r = torch.exp(lr.detach())
    if o.kind.formula == "sapo":
        t = torch.where(adv_tok > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        # r = ∞: σ(t(r − 1)) = 1 and its derivative 0 (float64: e^(−t·e^lr)·e^lr underflows).
        live = torch.isfinite(r) & (adv_tok != 0)
        rl = torch.exp(torch.where(live, lr, 0.0))
        term = torch.where(live, -torch.sigmoid(t * (rl - 1.0)) * 4.0 / t * adv_tok,
                           -4.0 / t * adv_tok)
        return term * mask, lr.new_zeros(())
    lo, hi = o.clip()
    rc, rho, live = _clip_branch(plan, r, adv_tok)
    rl = torch.exp(torch.where(live, lr, 0.0))
    term = torch.where(live, -adv_tok * rl, torch.where(adv_tok == 0, 0.0, -adv_tok * rho))
    # as TRL counts them: a ratio capped by clip_delta is not clipped above
    is_clipped = (((rc < 1.0 - lo) & (adv_tok < 0)) | ((rc > 1.0 + hi) & (adv_tok > 0))).float() * mask
    return term * mask, is_clipped.sum()


def _clip_branch(plan: LossPlan, r, adv_tok):
    """The branch each token's clipped term takes: ``(rc, rho, live)`` (n,) — rc = min(r,
    clip_delta), rho the ratio the term is −A·rho of, live where that is r itself (the term's
    only branch with a gradient)."""
    o = plan.opts
    lo, hi = o.clip()
    # max(−A·ρ, −A·clip(r)) with ρ = min(r, clip_delta) (TRL's two-sided clip), then for A < 0
    # the dual clip min(·, −A·c). The branch taken is r itself ("live") or a constant.
    rc = r if o.clip_delta is None else torch.clamp(r, max=o.clip_delta)
    cl = torch.clamp(r, 1.0 - lo, 1.0 + hi)
    rho = torch.where(adv_tok > 0, torch.minimum(rc, cl), torch.maximum(rc, cl))
    if o.clip_ratio_c is not None:  # dual clip (verl): negative advantages bounded by −A·c
        rho = torch.where(adv_tok < 0, torch.clamp(rho, max=o.clip_ratio_c), rho)
    return rc, rho, (rho == r) & (adv_tok != 0)


def _clip_terms_grad(plan: LossPlan, lr, adv_tok):
    """d(term)/d lr (n,) of :func:`_clip_terms`'s terms (before the mask): exactly 0 where the term
    is constant (clipped, dual-clipped, A = 0, sapo's sigmoid saturated or e^lr past fp32's
    range), else the formula's derivative (∞ where −A·e^lr itself overflows)."""
    o = plan.opts
    r = torch.exp(lr)
    if o.kind.formula == "sapo":
        t = torch.where(adv_tok > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        live = torch.isfinite(r) & (adv_tok != 0)
        rl = torch.where(live, r, 1.0)
        sg = torch.sigmoid(t * (rl - 1.0))
        # d/dlr −(4/t)·A·σ(t(e^lr − 1)) = −4A·σ(1 − σ)·e^lr
        return torch.where(live, -4.0 * adv_tok * (sg * (1.0 - sg)) * rl, 0.0)
    _, _, live = _clip_branch(plan, r, adv_tok)
    return torch.where(live, -adv_tok * r, 0.0)


def _clip_loss(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    o = plan.opts
    d_tok = (logp - old) * mask
    log_s = None
    if o.ratio_level == "sequence":
        # the sequence's length-averaged ratio in token form sg(s_i) · exp(logp − sg(logp)), as gspo:
        # each token carries the sequence ratio's value and its own log-prob's gradient
        L = plan.seq_len[s0:s1]
        log_s = segment_sum(d_tok.detach(), plan.lengths[s0:s1]) / L.clamp_min(1)
        lr = log_s[seq - s0] * mask + (logp - logp.detach()) * mask
    else:
        lr = d_tok
    r = torch.exp(lr.detach())
    adv_tok = plan.adv[seq]
    if o.kind.formula == "cispo":
        # −sg(min(r, ε_high)) · A · logp (TRL): r = ∞ past fp32's exp range weighs ε_high
        hi = o.clip()[1]
        term = -torch.clamp(r, max=hi) * adv_tok * logp * mask
        n_clip = (((r > hi) & (adv_tok > 0)).float() * mask).sum()
    else:
        term, n_clip = _clip_terms(plan, lr, adv_tok, mask)
    if tw is not None:
        term = term * tw
    if sw is not None:
        term = term * sw[seq - s0]
    div, den = _clip_norm(plan, seq)
    loss = (term if div is None else term / div).sum() / den
    if log_s is not None:  # metrics per sequence, as gspo's
        ok = (plan.seq_len[s0:s1] > 0).float()
        ls, v = log_s * ok, torch.expm1(log_s) * ok
        return loss, torch.stack([ls.sum(), ls.abs().sum(), (v * v).sum(), n_clip])
    dd = d_tok.detach()
    v = (r - 1.0) * mask
    sums = torch.stack([dd.sum(), dd.abs().sum(), (v * v).sum(), n_clip])
    return loss, sums


def _clip_norm(plan: LossPlan, seq):
    """How :func:`_clip_loss` aggregates its token terms: ``(divisor (n,) or None, denominator)``,
    loss = Σ term / divisor / denominator."""
    agg = plan.opts.kind.aggregate
    if agg is Agg.SEQ_MEAN:
        return plan.seq_len[seq].clamp_min(1), plan.seq_denom
    if agg is Agg.SEQ_SUM:  # each sequence's token sum, mean over sequences (TRL's LUSPO)
        return None, plan.seq_denom
    if agg is Agg.TOKEN_MEAN:
        return None, plan.tok_denom
    return None, plan.dr_denom  # MAX_LENGTH


def _clip_grad(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    """d(:func:`_clip_loss`)/d logp (n,) fp32: each token's d term/d lr (its own log-prob's
    gradient also at ``ratio_level="sequence"``) times its weights and aggregation."""
    o = plan.opts
    lr = (logp - old) * mask
    if o.ratio_level == "sequence":
        log_s = segment_sum(lr, plan.lengths[s0:s1]) / plan.seq_len[s0:s1].clamp_min(1)
        lr = log_s[seq - s0] * mask
    adv_tok = plan.adv[seq]
    if o.kind.formula == "cispo":  # −sg(min(r, ε_high)) · A · logp
        g = -torch.clamp(torch.exp(lr), max=o.clip()[1]) * adv_tok
    else:
        g = _clip_terms_grad(plan, lr, adv_tok)
    div, den = _clip_norm(plan, seq)
    return _weighted(g, mask, tw, None if sw is None else sw[seq - s0], div, den)


def _weighted(g, mask, tw, sw_tok, div, den):
    """A token term's gradient ``g`` (n,) times the weight the loss gives the term, mask · tw ·
    sw / div / den (None: 1). A token of weight 0 gets exactly 0, also where ``g`` is ∞ (an
    overflowing e^lr of a masked or cut token: no 0 · ∞ = NaN)."""
    w = mask
    for f in (tw, sw_tok):
        if f is not None:
            w = w * f
    w = (w if div is None else w / div) / den
    return torch.where(w != 0, g * w, 0.0)


def _gspo_loss(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    lengths = plan.lengths[s0:s1]  # the chunk holds all their tokens
    L = plan.seq_len[s0:s1]
    d_tok = (logp - old) * mask
    log_s = segment_sum(d_tok.detach(), lengths) / L.clamp_min(1)
    # Token form s_{i,t} = sg(s_i) · exp(logp − sg(logp)): the value of the sequence ratio, the
    # gradient of each token's own log-prob (passed as its log, exp'd by _clip_terms).
    lr_tok = log_s[seq - s0] + logp - logp.detach()
    adv_tok = plan.adv[seq]
    term, n_clip = _clip_terms(plan, lr_tok, adv_tok, mask)
    if tw is not None:
        term = term * tw
    if sw is not None:
        term = term * sw[seq - s0]
    per_seq = segment_sum(term, lengths) / L.clamp_min(1)
    loss = per_seq.sum() / plan.seq_denom
    ok = (L > 0).float()
    ls = log_s * ok
    v = torch.expm1(log_s) * ok
    sums = torch.stack([ls.sum(), ls.abs().sum(), (v * v).sum(), n_clip])
    return loss, sums


def _gspo_grad(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    """d(:func:`_gspo_loss`)/d logp (n,) fp32: each token's d term/d lr at the sequence ratio
    (the token form passes its own log-prob's gradient), weighted, / L / the sequence count."""
    L = plan.seq_len[s0:s1]
    log_s = segment_sum((logp - old) * mask, plan.lengths[s0:s1]) / L.clamp_min(1)
    g = _clip_terms_grad(plan, log_s[seq - s0], plan.adv[seq])
    return _weighted(g, mask, tw, None if sw is None else sw[seq - s0], L.clamp_min(1)[seq - s0],
                     plan.seq_denom)


def _vespo_loss(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    """VESPO (TRL's): −sg(φ(w_i)) · A_i · logp per token, summed over the batch's tokens / the token
    normalizer; w_i = exp(Σ_t clamp(Δ_t, ±20)) the sequence ratio (log clamped to [log 1e-8, 20]),
    φ(w) = e^(λ + k log w − λw) with (k, λ) by the advantage's sign. The metric slot of the clip
    fraction holds Σ φ over the sequences (``vespo_phi_mean``)."""
    log_w, phi = _vespo_phi(plan, logp, old, mask, s0, s1)
    term = -phi[seq - s0] * plan.adv[seq] * logp * mask
    if tw is not None:
        term = term * tw
    if sw is not None:
        term = term * sw[seq - s0]
    loss = term.sum() / plan.tok_denom
    ok = (plan.seq_len[s0:s1] > 0).float()
    ls = log_w * ok
    v = torch.expm1(log_w) * ok
    sums = torch.stack([ls.sum(), ls.abs().sum(), (v * v).sum(), (phi * ok).sum()])
    return loss, sums


def _vespo_phi(plan: LossPlan, logp, old, mask, s0, s1):
    """VESPO's (log w, φ(w)) of sequences [s0, s1), (s1 − s0,) each, no gradient."""
    o = plan.opts
    d_tok = ((logp - old) * mask).detach()
    log_w = torch.clamp(segment_sum(torch.clamp(d_tok, -20.0, 20.0) * mask, plan.lengths[s0:s1]),
                        math.log(1e-8), 20.0)
    pos = plan.adv[s0:s1] >= 0
    k = torch.where(pos, o.vespo_k_pos, o.vespo_k_neg)
    lam = torch.where(pos, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return log_w, phi


def _vespo_grad(plan: LossPlan, logp, old, mask, seq, s0, s1, tw=None, sw=None):
    """d(:func:`_vespo_loss`)/d logp (n,) fp32: −φ(w_i)·A_i per valid token (φ is a constant)."""
    g = -_vespo_phi(plan, logp, old, mask, s0, s1)[1][seq - s0] * plan.adv[seq] * mask
    if tw is not None:
        g = g * tw
    if sw is not None:
        g = g * sw[seq - s0]
    return g / plan.tok_denom


def _kl_term(plan: LossPlan, logp, old, mask, seq, s0, s1, sl, lengths=None):
    """TRL's k3 KL to the reference, aggregated as the loss aggregates its policy term.
    Returns ``(kl loss without β, Σ of the per-token KL over valid tokens (detached))``.
    ``lengths``: the tokens of each sequence present (default: all of them)."""
    o = plan.opts
    ref = plan.ref[sl]
    x = (ref - logp) * mask
    kl = (torch.exp(x) - x - 1.0) * mask
    if o.use_bias_correction_kl:
        if _kl_sequence_ratio(o):
            lengths = plan.lengths[s0:s1]
            L = plan.seq_len[s0:s1]
            log_s = segment_sum(((logp - old) * mask), lengths) / L.clamp_min(1)
            coef = torch.exp(log_s)[seq - s0]
        else:
            coef = torch.exp((logp - old) * mask)
        kl = kl * coef
    lengths = plan.lengths[s0:s1] if lengths is None else lengths
    L = plan.seq_len[s0:s1]
    per_seq, by_len, den = _kl_norm(plan)
    if per_seq:
        per_seq = segment_sum(kl, lengths)
        if by_len:
            per_seq = per_seq / L.clamp_min(1)
        loss = per_seq.sum() / den
    else:
        loss = kl.sum() / den
    return loss, kl.detach().sum()


def _kl_sequence_ratio(o: LossOptions) -> bool:
    """The bias-corrected KL weighs by the sequence ratio (else by the token's own ratio)."""
    return o.kind.formula == "gspo" or o.ratio_level == "sequence"


def _kl_norm(plan: LossPlan):
    """How :func:`_kl_term` aggregates the per-token KL: ``(per sequence, / L, denominator)`` —
    as the loss aggregates its policy term."""
    o = plan.opts
    agg = o.kind.aggregate
    if agg is Agg.SEQ_MEAN:  # OPO's seq_reduce="sum" sums each sequence (the other losses: "mean")
        return True, o.seq_reduce != "sum", plan.seq_denom
    if agg is Agg.MAX_LENGTH:
        return False, False, plan.dr_denom
    if agg is Agg.SEQ_SUM:
        return False, False, plan.seq_denom
    return False, False, plan.tok_denom


def _kl_grad(plan: LossPlan, logp, old, mask, seq, s0, s1, sl):
    """d(:func:`_kl_term`'s loss, without β)/d logp (n,) fp32."""
    o = plan.opts
    x = (plan.ref[sl] - logp) * mask
    ex = torch.exp(x)
    g = (1.0 - ex) * mask  # d(e^x − x − 1)/d logp with dx/d logp = −mask
    if o.use_bias_correction_kl:
        kl = (ex - x - 1.0) * mask
        if _kl_sequence_ratio(o):
            # kl_u · e^(log s): log s = Σ Δ / L moves with every token of the sequence
            lengths = plan.lengths[s0:s1]
            L = plan.seq_len[s0:s1].clamp_min(1)
            coef = torch.exp(segment_sum((logp - old) * mask, lengths) / L)[seq - s0]
            g = (g + (segment_sum(kl, lengths) / L)[seq - s0] * mask) * coef
        else:
            g = (g + kl * mask) * torch.exp((logp - old) * mask)
    _, by_len, den = _kl_norm(plan)
    if by_len:
        g = g / plan.seq_len[seq].clamp_min(1)
    return g / den


def _group_softmax_loss(plan: LossPlan, logp, old, mask, seq, s0, s1):
    """The authors' released weighting (docs/contract.md); needs the whole batch (s0 = 0, s1 = B)."""
    o = plan.opts
    G = o.group_size
    seqlogp, raw, ok, g, cnt, has = _group_softmax_parts(plan, logp, old, mask, s0, s1)
    delta = _clamp_ratio(plan, raw)
    d2 = (delta * ok).view(-1, G) ** 2
    per_group = -(1.0 / o.alpha) * (g * (seqlogp * ok).view(-1, G)).sum(dim=1) \
        + 0.5 * o.mu * d2.sum(dim=1) / cnt.squeeze(1).clamp_min(1)
    loss = (per_group * has).sum() / has.sum().clamp_min(1)
    dd = delta.detach() * ok
    sums = torch.stack([dd.sum(), dd.abs().sum(), (dd * dd).sum(), dd.new_zeros(())])
    return loss, sums


def _group_softmax_parts(plan: LossPlan, logp, old, mask, s0, s1):
    """``(seqlogp, raw Δ, ok, g, cnt, has)`` of :func:`_group_softmax_loss`: the sequences' mean
    log-probs and unclamped Δ (B,) (differentiable), ok (B,) bool, the centred weights g
    (B/G, G) and the valid count (B/G, 1) of each group (constants), has (B/G,) fp32."""
    o = plan.opts
    G = o.group_size
    lengths = plan.lengths[s0:s1]  # the chunk holds all their tokens
    L = plan.seq_len[s0:s1]
    ok = L > 0
    seqlogp = segment_sum(logp * mask, lengths) / L.clamp_min(1)
    old_seqlogp = segment_sum(old * mask, lengths) / L.clamp_min(1)
    raw = seqlogp - old_seqlogp
    delta = _clamp_ratio(plan, raw)
    a = plan.adv[s0:s1]
    n_ok = ok.float().sum().clamp_min(1)
    tau_eff = torch.tensor(float(o.tau), device=logp.device)
    if o.adaptive_tau:
        logV = math.log(max(plan.vocab_size, 2))
        h_s = torch.clamp(-(old_seqlogp * ok).sum() / n_ok / logV, 0, 1)
        h_d = torch.clamp(-(seqlogp.detach() * ok).sum() / n_ok / logV, 0, 1)
        conf = 1 - h_d
        a_ok = a[ok]
        if a_ok.numel() and (a_ok.max() > a_ok.min()):
            rs = 2 * ((a_ok - a_ok.min()) / (a_ok.max() - a_ok.min())).mean() - 1
        else:
            rs = a.new_zeros(())
        tau_eff = torch.clamp(o.tau * (1 + 0.2 * h_s + 0.5 * conf * (-rs)), 0.2, 1.5)
    okg = ok.view(-1, G)
    neg_inf = torch.full_like(a.view(-1, G), -math.inf)
    q = torch.softmax(torch.where(okg, a.view(-1, G) / o.beta_r, neg_inf), dim=1)
    p = torch.softmax(torch.where(okg, delta.detach().view(-1, G) / tau_eff, neg_inf), dim=1)
    w = q.pow(o.alpha) * p.pow(1 - o.alpha)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    cnt = okg.float().sum(dim=1, keepdim=True)
    w = torch.nan_to_num(w)  # groups with no valid sequence: all-zero weights, excluded below
    g = (w - (w * okg).sum(dim=1, keepdim=True) / cnt.clamp_min(1)) * okg
    has = (cnt.squeeze(1) > 0).float()
    return seqlogp, raw, ok, g, cnt, has


def _group_softmax_grad(plan: LossPlan, logp, old, mask, seq, s0, s1):
    """d(:func:`_group_softmax_loss`)/d logp (n,) fp32: per sequence −g/α + μΔ/count (the
    weights g are constants), over the groups with a valid sequence, spread as mask / L."""
    o = plan.opts
    G = o.group_size
    _, raw, ok, g, cnt, has = _group_softmax_parts(plan, logp, old, mask, s0, s1)
    okf = ok.to(raw.dtype)
    slope = _clamp_ratio(plan, raw) * okf
    c = o.max_log_ratio
    if c is not None:
        slope = torch.where((raw >= -c) & (raw <= c), slope, 0.0)
    per = g * okf.view(-1, G) * -(1.0 / o.alpha) + o.mu * slope.view(-1, G) / cnt.clamp_min(1)
    per = per * has[:, None] / has.sum().clamp_min(1)
    return (per.reshape(-1) / plan.seq_len[s0:s1].clamp_min(1))[seq - s0] * mask


# the policy-term formula of each LossType.formula (group_softmax: whole groups, no token weights)
_POLICY_TERMS = {"opo": _opo_loss, "gspo": _gspo_loss, "vespo": _vespo_loss, "ppo_clip": _clip_loss,
                 "cispo": _clip_loss, "sapo": _clip_loss}
# the gradient d(formula)/d logp of each policy-term formula, in closed form (same arguments)
_GRADIENTS = {_opo_loss: _opo_grad, _clip_loss: _clip_grad, _gspo_loss: _gspo_grad,
              _vespo_loss: _vespo_grad, _group_softmax_loss: _group_softmax_grad}


def finish_metrics(plan: LossPlan, sums: torch.Tensor, entropy_sum: torch.Tensor) -> dict:
    """Metrics dict (detached 0-d fp32 tensors) from the combined partials of every chunk."""
    # Per-token losses average their Δ over tokens, per-sequence ones over sequences.
    n_items = (plan.n_tokens if plan.token_separable else plan.n_seqs).clamp_min(1)
    om = plan.omega
    ok = plan.seq_len > 0
    if om is not None:
        # over the sequences with a valid token (0 if none), without a host synchronization
        n = ok.float().sum()
        mean = torch.where(ok, om, 0.0).sum() / n.clamp_min(1)
        var = torch.where(ok, (om - mean) ** 2, 0.0).sum() / n.clamp_min(1)
        has = n > 0
        om_stats = (torch.where(has, torch.where(ok, om, math.inf).min(), 0.0),
                    torch.where(has, torch.where(ok, om, -math.inf).max(), 0.0),
                    torch.where(has, var.sqrt(), 0.0))
    else:
        z = sums.new_zeros(())
        om_stats = (z, z, z)
    ntok = plan.n_tokens.clamp_min(1)
    out = {
        "entropy": entropy_sum / ntok,
        "delta_mean": sums[S_DELTA] / n_items,
        "delta_abs_mean": sums[S_ABS] / n_items,
        "chi2": sums[S_V2] / n_items,
        "omega_min": om_stats[0],
        "omega_max": om_stats[1],
        "omega_std": om_stats[2],
        "num_tokens": plan.n_tokens,
        "num_seqs": plan.n_seqs,
    }
    metric = plan.opts.kind.metric
    if metric == "vespo_phi_mean":  # Σ φ over sequences
        out[metric] = sums[S_CLIP] / plan.n_seqs.clamp_min(1)
    elif metric == "clip_frac":
        out[metric] = sums[S_CLIP] / ntok
    if plan.ref is not None:
        out["kl"] = sums[S_KL] / ntok
    if plan.rollout is not None:
        out["mismatch_k1"] = sums[S_K1] / ntok
        out["mismatch_k3"] = sums[S_K3] / ntok
        if plan.opts.is_correction is not None:
            nw = sums[S_WN]
            has = nw > 0
            out["is_weight_mean"] = sums[S_W] / nw.clamp_min(1)
            out["is_weight_min"] = torch.where(has, sums[S_WMIN], 0.0)
            out["is_weight_max"] = torch.where(has, sums[S_WMAX], 0.0)
            out["is_frac_cut"] = sums[S_WCUT] / nw.clamp_min(1)
    if plan.ent_mask is not None:
        out["entropy_mask_frac"] = (plan.ent_mask.sum() / ntok)
    return {k: v.detach().float() for k, v in out.items()}
