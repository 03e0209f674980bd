"""A float64 reference of the opo_kernels math, written from docs/contract.md for the tests.

Nothing here imports opo_kernels: the logits are materialized in float64 and every loss is written
out sequence by sequence with plain autograd, so a test can compare the fused kernels with the
formulas of the spec rather than with another copy of the same code.

Layout used throughout: *packed*. ``N`` tokens in a row; ``lengths`` (a list of ``B`` ints) gives
each sequence's run of consecutive tokens (a (B, T) batch is ``lengths = [T] * B``). ``mask`` (N,)
is 1 for a valid token, 0 otherwise (prompt, padding, ``targets == ignore_index``).
"""
from __future__ import annotations

import math

import torch

STD_EPS = 1e-6
CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "dr_grpo": (0.2, 0.2),
                 "bnpo": (0.2, 0.2), "cispo": (0.2, 5.0)}


# ------------------------------------------------------------------------------------------------
# Log-probs (contract: Notation)
# ------------------------------------------------------------------------------------------------

def logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """float64 ``(logp, entropy)`` of ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden: (..., H) any float dtype (upcast; keep it a float64 leaf to get reference gradients).
    weight: (V, H). bias: (V,) or None. targets: (...) int64. Returns two float64 tensors shaped
    like ``targets``; logp is 0 where the target is ``ignore_index`` or outside [0, V).
    """
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    lsm = torch.log_softmax(z / temperature, dim=-1)
    V = weight.shape[0]
    ok = (targets != ignore_index) & (targets >= 0) & (targets < V)
    idx = torch.where(ok, targets, torch.zeros_like(targets))
    logp = lsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * ok.double()
    # −inf logits (p = 0) add 0 to the entropy, and nothing to its gradient (never 0·∞).
    entropy = -(lsm.exp() * torch.where(torch.isfinite(lsm), lsm, 0.0)).sum(-1)
    return logp, entropy


def spans(lengths):
    """[(start, end)] of each sequence's tokens."""
    out, t = [], 0
    for n in lengths:
        out.append((t, t + n))
        t += n
    return out


# ------------------------------------------------------------------------------------------------
# Advantages and escort weights (contract: The OPO loss, Advantages)
# ------------------------------------------------------------------------------------------------

def group_advantages(rewards, group_size, scale="group", eps=STD_EPS):
    """(B,) float64 group-relative advantages, one group at a time."""
    r = rewards.double().tolist()
    out = []
    for g0 in range(0, len(r), group_size):
        g = r[g0:g0 + group_size]
        mean = sum(g) / len(g)
        for x in g:
            a = x - mean
            if scale == "group":
                std = math.sqrt(sum((y - mean) ** 2 for y in g) / (len(g) - 1))
                a = a / (std + eps)
            elif scale == "batch":
                bm = sum(r) / len(r)
                bstd = math.sqrt(sum((y - bm) ** 2 for y in r) / (len(r) - 1)) if len(r) > 1 else 0.0
                a = a / (bstd + eps)
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def escort_weights(advantages, alpha=0.4, tau=1.0, normalize="zscore", norm_scope="batch",
                   group_size=None, anchor_seq_logps=None, valid=None):
    """(B,) float64 ω: x = (1−α)A/τ [− (1−α)ℓ], exp shifted by the scope's max, then normalized
    over the valid sequences of the scope (population std). Invalid sequences get 0."""
    a = advantages.detach().double()
    B = a.shape[0]
    x = (1 - alpha) * a / tau
    if anchor_seq_logps is not None:
        x = x - (1 - alpha) * anchor_seq_logps.detach().double()
    valid = [True] * B if valid is None else [bool(v) for v in valid]
    scopes = [list(range(B))] if norm_scope == "batch" else \
        [list(range(g, g + group_size)) for g in range(0, B, group_size)]
    omega = torch.zeros(B, dtype=torch.float64)
    for sc in scopes:
        idx = [i for i in sc if valid[i]]
        if not idx:
            continue
        xs = x[idx]
        w = torch.exp(xs - xs.max())
        if normalize == "zscore":
            mean = w.mean()
            std = ((w - mean) ** 2).mean().sqrt()
            om = (w - mean) / (std + STD_EPS)
        else:
            om = w / w.mean() - 1.0
        omega[idx] = om
    return omega


# ------------------------------------------------------------------------------------------------
# The losses (contract: The OPO loss, Reference-code weighting, Baselines)
# ------------------------------------------------------------------------------------------------

def policy_loss(logp, old, advantages, mask, lengths, *, loss="opo", alpha=0.4, mu=1.0, tau=1.0,
                level="sequence", seq_reduce="mean", ratio="log", normalize="zscore",
                norm_scope="batch", group_size=None, ref_correction=False, max_log_ratio=None,
                escort="paper", clip_eps_low=None, clip_eps_high=None, max_completion_length=None,
                beta_r=0.15, adaptive_tau=True, vocab_size=None, entropy=None, omega=None,
                ref_logps=None, rollout_logps=None, num_items_in_batch=None, num_seqs_in_batch=None,
                beta=0.0, use_bias_correction_kl=False, is_correction=None, is_clip_max=3.0,
                is_clip_min=None, entropy_coef=0.0, top_entropy_quantile=1.0, clip_ratio_c=None,
                sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """float64 loss and metrics.

    logp: (N,) float64 (differentiable). old: (N,) or None (= logp detached: on-policy).
    advantages: (B,). mask: (N,) 0/1. lengths: list of B ints. entropy: (N,) or None.
    Returns ``(loss, metrics)``: a 0-d float64 tensor and a dict of Python floats (the keys of the
    API's metrics dict; omega_* only for paper-mode OPO, clip_frac only for the baselines).
    The RL terms (contract: RL terms) are added by :func:`_rl_terms`.
    """
    rl = dict(omega=omega, ref_logps=ref_logps, rollout_logps=rollout_logps,
              num_items_in_batch=num_items_in_batch, num_seqs_in_batch=num_seqs_in_batch, beta=beta,
              use_bias_correction_kl=use_bias_correction_kl, is_correction=is_correction,
              is_clip_max=is_clip_max, is_clip_min=is_clip_min, entropy_coef=entropy_coef,
              top_entropy_quantile=top_entropy_quantile)
    logp = logp.double()
    old = logp.detach() if old is None else old.double()
    mask = mask.double()
    # Masked positions may hold anything (even NaN): take them out before any arithmetic.
    okm = mask > 0
    old = torch.where(okm, old, torch.zeros_like(old))
    A = advantages.detach().double()
    A = torch.where(torch.isfinite(A), A, torch.zeros_like(A))
    B = len(lengths)
    sp = spans(lengths)
    L = [float(mask[a:b].sum()) for a, b in sp]
    valid = [n > 0 for n in L]
    n_seqs = sum(valid)
    n_tok = float(mask.sum())
    zero = logp.sum() * 0.0  # keeps the graph connected when nothing is valid

    def tok(i):
        a, b = sp[i]
        m = okm[a:b]
        return logp[a:b][m], old[a:b][m]

    tw, sw = _rl_weights(rl, logp, old, okm, sp, L, valid, entropy, metrics := {})
    seq_den = float(num_seqs_in_batch) if num_seqs_in_batch is not None else n_seqs
    tok_den = float(num_items_in_batch) if num_items_in_batch is not None else n_tok
    seq_den, tok_den = max(seq_den, 1.0), max(tok_den, 1.0)

    def tokw(i):
        a, b = sp[i]
        return tw[a:b][okm[a:b]]

    def with_terms(total):
        return total + _rl_terms(rl, loss, logp, old, okm, sp, L, valid, entropy, tw, seq_den,
                                 tok_den, level, seq_reduce, B, max_completion_length, metrics)

    metrics.update({"num_tokens": n_tok, "num_seqs": float(n_seqs)})
    if entropy is not None:
        ent = entropy.detach().double()
        metrics["entropy"] = float(ent[okm].sum()) / max(n_tok, 1.0)

    def clamp(d):
        return d if max_log_ratio is None else torch.clamp(d, -max_log_ratio, max_log_ratio)

    def finish(deltas, vs):
        n = len(deltas)
        metrics["delta_mean"] = sum(float(d) for d in deltas) / max(n, 1)
        metrics["delta_abs_mean"] = sum(abs(float(d)) for d in deltas) / max(n, 1)
        metrics["chi2"] = sum(float(v) ** 2 for v in vs) / max(n, 1)

    if loss == "opo" and escort == "paper":
        ell = None
        if ref_correction:
            ell = torch.zeros(B, dtype=torch.float64)
            for i in range(B):
                if valid[i]:
                    s = tok(i)[1].sum()
                    ell[i] = s / L[i] if seq_reduce == "mean" else s
        omega = escort_weights(A, alpha, tau, normalize, norm_scope, group_size, ell, valid) \
            if rl["omega"] is None else torch.where(torch.tensor(valid), rl["omega"].double(), 0.0)
        om_valid = omega[torch.tensor(valid, dtype=torch.bool)] if n_seqs else None
        if om_valid is not None:
            metrics["omega_min"] = float(om_valid.min())
            metrics["omega_max"] = float(om_valid.max())
            metrics["omega_std"] = float(((om_valid - om_valid.mean()) ** 2).mean().sqrt())
        else:
            metrics.update(omega_min=0.0, omega_max=0.0, omega_std=0.0)
        deltas, vs, total = [], [], zero
        for i in range(B):
            if not valid[i]:
                continue
            lp, od = tok(i)
            w = tokw(i)
            if level == "sequence":
                # token weights scale each token's share of the gradient; the value is Δ's
                lpw = lp.detach() + w * (lp - lp.detach())
                d = (lpw - od).sum()
                if seq_reduce == "mean":
                    d = d / L[i]
                d = clamp(d)
                v = torch.expm1(d) if ratio == "exact" else d
                total = total + sw[i] * (-omega[i] * v + 0.5 * mu * v * v) / seq_den
                deltas.append(d.detach())
                vs.append(v.detach())
            else:
                d = clamp(lp - od)
                v = torch.expm1(d) if ratio == "exact" else d
                total = total + (sw[i] * w * (-omega[i] * v + 0.5 * mu * v * v)).sum() / tok_den
                deltas.extend(d.detach().unbind())
                vs.extend(v.detach().unbind())
        finish(deltas, vs)
        return with_terms(total), metrics

    if loss == "opo" and escort == "group_softmax":
        return _group_softmax(logp, old, A, okm, sp, L, valid, alpha=alpha, mu=mu, tau=tau,
                              group_size=group_size, beta_r=beta_r, adaptive_tau=adaptive_tau,
                              vocab_size=vocab_size, clamp=clamp, zero=zero, metrics=metrics,
                              finish=finish)

    # The clipped baselines.
    lo, hi = CLIP_DEFAULTS.get(loss, (0.2, 0.2))
    lo = lo if clip_eps_low is None else clip_eps_low
    hi = hi if clip_eps_high is None else clip_eps_high
    n_clipped = 0
    deltas, vs = [], []
    total = zero
    for i in range(B):
        if not valid[i]:
            continue
        lp, od = tok(i)
        if loss == "gspo":
            log_s = (lp - od).sum() / L[i]
            r = torch.exp(log_s.detach()) * torch.exp(lp - lp.detach())
            deltas.append(log_s.detach())
            vs.append(torch.expm1(log_s.detach()))
        else:
            r = torch.exp(lp - od)
            deltas.extend((lp - od).detach().unbind())
            vs.extend((r.detach() - 1).unbind())
        if loss == "cispo":  # −sg(min(r, ε_high)) · A · logp
            term = -torch.clamp(r.detach(), max=hi) * A[i] * lp
            n_clipped += int(((r.detach() > hi) & (A[i] > 0)).sum())
        elif loss == "sapo":
            t = sapo_temperature_pos if A[i] > 0 else sapo_temperature_neg
            term = -torch.sigmoid(t * (r - 1)) * 4 / t * A[i]
        else:
            unclipped = -A[i] * r
            clipped = -A[i] * torch.clamp(r, 1 - lo, 1 + hi)
            term = torch.maximum(unclipped, clipped)
            n_clipped += int((clipped.detach() > unclipped.detach()).sum())
            if clip_ratio_c is not None and A[i] < 0:
                term = torch.minimum(term, -A[i] * clip_ratio_c)
        term = term * tokw(i) * sw[i]
        if loss in ("grpo", "gspo", "sapo"):
            total = total + term.sum() / L[i] / seq_den
        elif loss in ("dapo", "bnpo", "cispo"):
            total = total + term.sum() / tok_den
        else:
            nb = B if num_seqs_in_batch is None else num_seqs_in_batch
            total = total + term.sum() / (nb * max_completion_length)
    finish(deltas, vs)
    metrics["clip_frac"] = n_clipped / max(n_tok, 1.0)
    return with_terms(total), metrics


def _group_softmax(logp, old, A, okm, sp, L, valid, *, alpha, mu, tau, group_size, beta_r,
                   adaptive_tau, vocab_size, clamp, zero, metrics, finish):
    """The authors' released weighting (contract: Reference-code weighting), group by group."""
    B = len(sp)
    seqlogp = [None] * B
    old_seqlogp = [None] * B
    for i, (a, b) in enumerate(sp):
        if valid[i]:
            m = okm[a:b]
            seqlogp[i] = logp[a:b][m].sum() / L[i]
            old_seqlogp[i] = old[a:b][m].sum() / L[i]
    idx = [i for i in range(B) if valid[i]]
    delta = {i: clamp(seqlogp[i] - old_seqlogp[i]) for i in idx}
    tau_eff = tau
    if adaptive_tau and idx:
        logV = math.log(vocab_size)
        h_s = min(max(-sum(float(old_seqlogp[i]) for i in idx) / len(idx) / logV, 0.0), 1.0)
        h_d = min(max(-sum(float(seqlogp[i].detach()) for i in idx) / len(idx) / logV, 0.0), 1.0)
        conf = 1.0 - h_d
        a = [float(A[i]) for i in idx]
        rs = 2.0 * sum((x - min(a)) / (max(a) - min(a)) for x in a) / len(a) - 1.0 \
            if max(a) > min(a) else 0.0
        tau_eff = min(max(tau * (1 + 0.2 * h_s + 0.5 * conf * (-rs)), 0.2), 1.5)
    metrics["tau_eff"] = tau_eff
    total, n_groups = zero, 0
    for g0 in range(0, B, group_size):
        members = [i for i in range(g0, g0 + group_size) if valid[i]]
        if not members:
            continue
        n_groups += 1
        q = torch.softmax(torch.stack([A[i] for i in members]) / beta_r, 0)
        p = torch.softmax(torch.stack([delta[i].detach() for i in members]) / tau_eff, 0)
        w = q ** alpha * p ** (1 - alpha)
        w = w / w.sum()
        g = w - w.mean()
        sl = torch.stack([seqlogp[i] for i in members])
        d2 = torch.stack([delta[i] for i in members]) ** 2
        total = total + (-(1.0 / alpha) * (g * sl).sum() + 0.5 * mu * d2.mean())
    finish([delta[i].detach() for i in idx], [delta[i].detach() for i in idx])
    return (total / n_groups if n_groups else zero), metrics


# ------------------------------------------------------------------------------------------------
# The RL terms (contract: RL terms)
# ------------------------------------------------------------------------------------------------

def _rl_weights(rl, logp, old, okm, sp, L, valid, entropy, metrics):
    """Token weights tw (N,) (IS token modes × top-entropy mask; 1 elsewhere) and sequence
    weights sw (B,) (IS sequence modes; 1 elsewhere), float64, detached; IS metrics."""
    N, B = logp.shape[0], len(sp)
    tw = torch.ones(N, dtype=torch.float64)
    sw = torch.ones(B, dtype=torch.float64)
    roll = rl["rollout_logps"]
    n_tok = max(float(okm.sum()), 1.0)
    if roll is not None:
        roll = torch.where(okm, roll.double(), 0.0)
        d = torch.where(okm, old.detach() - roll, 0.0)   # log π_anchor − log π_rollout
        metrics["mismatch_k1"] = float((-d)[okm].sum()) / n_tok
        metrics["mismatch_k3"] = float((torch.exp(d) - d - 1)[okm].sum()) / n_tok
        mode = rl["is_correction"]
        if mode is not None:
            lo = -math.inf if rl["is_clip_min"] is None else rl["is_clip_min"]
            hi = math.inf if rl["is_clip_max"] is None else rl["is_clip_max"]
            if mode.startswith("sequence"):
                raw = [math.exp(float(d[a:b].sum())) for a, b in sp]
                units = [i for i in range(B) if valid[i]]
            else:
                raw = torch.exp(d).tolist()
                units = okm.nonzero().squeeze(-1).tolist()
            ws, cut = [], 0
            for u in units:
                w = raw[u]
                if w < lo or w > hi:
                    cut += 1
                    w = min(max(w, lo), hi) if mode.endswith("truncate") else 0.0
                ws.append(w)
                if mode.startswith("sequence"):
                    sw[u] = w
                else:
                    tw[u] = w
            metrics["is_weight_mean"] = sum(ws) / max(len(ws), 1)
            metrics["is_weight_min"] = min(ws) if ws else 0.0
            metrics["is_weight_max"] = max(ws) if ws else 0.0
            metrics["is_frac_cut"] = cut / max(len(ws), 1)
    q = rl["top_entropy_quantile"]
    if q < 1.0:
        e = entropy.detach().double()
        ev = sorted(e[okm].tolist())
        # torch.quantile's linear interpolation at 1 − q
        pos = (1.0 - q) * (len(ev) - 1)
        k = int(math.floor(pos))
        thr = ev[k] + (ev[min(k + 1, len(ev) - 1)] - ev[k]) * (pos - k)
        em = ((e >= thr) & okm).double()
        tw = tw * em
        rl["_ent_mask"] = em
        metrics["entropy_mask_frac"] = float(em.sum()) / n_tok
    return tw, sw


def _rl_terms(rl, loss, logp, old, okm, sp, L, valid, entropy, tw, seq_den, tok_den, level,
              seq_reduce, B, mcl, metrics):
    """β · KL (k3, aggregated as the loss aggregates) − entropy_coef · mean H."""
    total = logp.sum() * 0.0
    n_tok = max(float(okm.sum()), 1.0)
    ref = rl["ref_logps"]
    if ref is not None:
        ref = torch.where(okm, ref.double(), 0.0)
        x = torch.where(okm, ref - logp, 0.0)
        kl = (torch.exp(x) - x - 1) * okm.double()
        if rl["beta"] > 0 and rl["use_bias_correction_kl"]:
            r = torch.where(okm, logp - old, 0.0)
            if loss == "gspo":
                coef = torch.zeros_like(kl)
                for i, (a, b) in enumerate(sp):
                    if valid[i]:
                        coef[a:b] = torch.exp(r[a:b].sum() / L[i])
            else:
                coef = torch.exp(r)
            kl = kl * coef
        metrics["kl"] = float(kl.detach().sum()) / n_tok
        per_seq = loss in ("grpo", "sapo", "gspo") or (loss == "opo" and level == "sequence")
        agg = total
        if per_seq:
            for i, (a, b) in enumerate(sp):
                if valid[i]:
                    k = kl[a:b].sum()
                    agg = agg + (k if (loss == "opo" and seq_reduce == "sum") else k / L[i]) / seq_den
        elif loss == "dr_grpo":
            nb = B if rl["num_seqs_in_batch"] is None else rl["num_seqs_in_batch"]
            agg = kl.sum() / (nb * mcl)
        else:
            agg = kl.sum() / tok_den
        total = total + rl["beta"] * agg
    if rl["entropy_coef"] > 0:
        eff = okm.double() if "_ent_mask" not in rl else rl["_ent_mask"]
        den = rl["num_items_in_batch"] if rl["num_items_in_batch"] is not None else float(eff.sum())
        total = total - rl["entropy_coef"] * (entropy * eff).sum() / max(den, 1.0)
    return total


# ------------------------------------------------------------------------------------------------
# Test batches
# ------------------------------------------------------------------------------------------------

PACKED_LENGTHS = [3, 0, 7, 12, 1, 5]  # an empty sequence, one longer than the small chunks


class Batch:
    """API inputs of one test batch plus what the reference needs.

    Attributes: hidden (B, T, H) or (N, H); weight (V, H); bias (V,) or None; targets (B, T) or
    (N,) int64; advantages (B,) fp32; old_logps like targets, fp32; mask like targets, bool;
    layout_kw ({} or {"cu_seqlens": ...} or {"seq_ids": ...}); lengths (list of B ints);
    valid (N,) float64 0/1 = mask & (targets != ignore_index).
    """

    def api_kwargs(self):
        return dict(bias=self.bias, **self.layout_kw)


def make_batch(layout="bt", dtype=torch.float32, *, B=6, T=7, H=32, V=257, lengths=None, bias=True,
               seed=0, old_noise=0.2, use_mask=True, junk_masked=True, ignore_index=-100,
               temperature=1.0, empty_row=True):
    """A random batch. layout: "bt" (B, T, H) | "cu" (N, H) + cu_seqlens | "ids" (N, H) + seq_ids.

    Some targets are ``ignore_index``, about a fifth of the mask is 0 (and for "bt" one row is
    fully masked when ``empty_row``); with ``junk_masked`` masked positions hold out-of-range
    targets and anchor log-probs of -30, which must change nothing. ``old_logps`` is the float64
    log-prob of the (dtype-rounded) inputs plus ``old_noise``·N(0, 1), so Δ ≠ 0.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "bt":
        lengths = [T] * B
        shape = (B, T)
    else:
        lengths = list(PACKED_LENGTHS if lengths is None else lengths)
        B = len(lengths)
        shape = (sum(lengths),)
    N = sum(lengths)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.1] = ignore_index
    mask = torch.rand(N, generator=g) > 0.2 if use_mask else torch.ones(N, dtype=torch.bool)
    if layout == "bt" and empty_row and use_mask and B >= 5:
        mask[4 * T:5 * T] = False
    if junk_masked and use_mask:
        junk = (~mask).nonzero().squeeze(-1)
        targets[junk[0::2]] = V + 3
        targets[junk[1::2]] = -7 if ignore_index != -7 else -8
    valid = (mask & (targets != ignore_index)).double()
    lp, _ = logprobs(hidden.reshape(N, H), weight, targets, b, temperature, ignore_index)
    old = (lp + old_noise * torch.randn(N, generator=g, dtype=torch.float64)).float()
    if junk_masked:
        old = torch.where(valid > 0, old, torch.full_like(old, -30.0))
    bt = Batch()
    bt.hidden, bt.weight, bt.bias = hidden, weight, b
    bt.targets = targets.reshape(shape)
    bt.advantages = torch.randn(B, generator=g)
    bt.old_logps = old.reshape(shape)
    bt.mask = mask.reshape(shape) if use_mask else None
    bt.lengths, bt.valid, bt.V, bt.H = lengths, valid, V, H
    bt.layout = layout
    if layout == "cu":
        bt.layout_kw = {"cu_seqlens": torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32)}
    elif layout == "ids":
        bt.layout_kw = {"seq_ids": torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))}
    else:
        bt.layout_kw = {}
    bt.max_len = T if layout == "bt" else max(lengths)
    return bt


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


def reference_loss(bt: Batch, options: dict, *, temperature=1.0, ignore_index=-100, old="batch",
                   grads=True):
    """float64 loss, metrics and gradients (hidden, weight, bias) of ``bt`` under ``options``
    (the API's keyword options, loss= included). old: "batch" (bt.old_logps) or None (on-policy).
    Gradients are float64 shaped like the inputs (None for a missing bias)."""
    H = bt.H
    h = bt.hidden.detach().double().requires_grad_(grads)
    w = bt.weight.detach().double().requires_grad_(grads)
    b = None if bt.bias is None else bt.bias.detach().double().requires_grad_(grads)
    tg = bt.targets.reshape(-1)
    lp, ent = logprobs(h.reshape(-1, H), w, tg, b, temperature, ignore_index)
    opts = dict(options)
    if opts.get("loss") == "dr_grpo" and opts.get("max_completion_length") is None:
        opts["max_completion_length"] = bt.max_len
    o = None if old is None else bt.old_logps.reshape(-1).double()
    for k in ("ref_logps", "rollout_logps"):
        if opts.get(k) is not None:
            opts[k] = opts[k].reshape(-1)
    loss, metrics = policy_loss(lp, o, bt.advantages, bt.valid, bt.lengths, vocab_size=bt.V,
                                entropy=ent, **opts)
    out = {"loss": loss.detach(), "metrics": metrics}
    if grads:
        gh, gw, *gb = torch.autograd.grad(loss, [h, w] + ([b] if b is not None else []),
                                          allow_unused=True)
        zero = lambda g, t: torch.zeros_like(t) if g is None else g  # noqa: E731
        out["grads"] = (zero(gh, h), zero(gw, w), zero(gb[0], b) if b is not None else None)
    return out


# ------------------------------------------------------------------------------------------------
# Test plumbing
# ------------------------------------------------------------------------------------------------

def native_available() -> bool:
    """Whether the native CPU op builds here (tests of the native backend skip otherwise)."""
    try:
        from opo_kernels import native
    except ImportError:  # pragma: no cover
        return False
    return bool(native.available())


def backends(*names):
    """pytest params for ``names``; "native" is skipped where the op does not build."""
    import pytest
    skip = pytest.mark.skipif(not native_available(), reason="native CPU op unavailable")
    return [pytest.param(n, marks=skip) if n == "native" else n for n in names]


def chunk_for(backend, chunk):
    """``chunk_size`` for ``backend``: the backends without logits chunks refuse one."""
    return None if backend in ("reference", "fused") else chunk


try:
    import pytest

    @pytest.fixture(autouse=True, scope="module")
    def single_thread():
        """Run a test module with one intra-op thread: at these tiny shapes extra threads only add
        barrier waits, and on a busy 2-core machine their spinning makes the suite ~10x slower.
        (Import it into a test module to use it; the thread count is restored afterwards.)"""
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)
except ImportError:  # pragma: no cover - the reference math does not need pytest
    pass
