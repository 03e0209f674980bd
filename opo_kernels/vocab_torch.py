"""The vocabulary pass in plain PyTorch, on one chunk of logits rows.

This is the portable fallback behind ``backend="torch"`` and the behaviour every other
vocabulary-pass backend (Triton, native C++) must reproduce. Contract (shared by all backends):

``vocab_forward(logits, targets, temperature, softcap=None) -> (logp, lse, entropy)``
    logits  (n, V) fp32/bf16/fp16, rows may be strided (last dim contiguous); −inf allowed
    targets (n,) int64 in [0, V) (masked positions never reach a backend; a row with a target
            outside [0, V) gets logp = 0 and no one-hot gradient)
    returns three fp32 (n,) tensors, with s computed in fp32 as u = logits / temperature, then
    s = softcap · tanh(u / softcap) when softcap is not None (else s = u):
    lse = logsumexp(s), logp = s[target] - lse, entropy = lse - sum(softmax(s) * s).

``vocab_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, out, softcap=None) -> out``
    Writes dz = (g_logp * (onehot - p) - g_ent * p * (s - lse + entropy)) · c / temperature into
    ``out`` (n, V) (which may be ``logits`` itself: in-place) and returns it, c = ds/du =
    1 − (s / softcap)² (c = 1 without softcap). ``grad_entropy`` and ``entropy`` may be None (no
    entropy gradient). p = exp(s - lse); a −inf logit has p = 0 and contributes 0 to the entropy
    and to every gradient (never 0·∞); with softcap it becomes s = −softcap, whose c is 0.

(The public ``logit_scale`` and ``temperature`` reach a vocabulary pass folded into these two:
:func:`opo_kernels.dispatch.pass_params`.)
"""
from __future__ import annotations

import torch


def _cap(s: torch.Tensor, softcap) -> torch.Tensor:
    """s, or softcap · tanh(s / softcap) (in place on the fp32 temporary s)."""
    if softcap is None:
        return s
    return s.div_(softcap).tanh_().mul_(softcap)


def vocab_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  softcap: float | None = None):
    n, V = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp)
    valid = (targets >= 0) & (targets < V)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    step = max(1, (1 << 22) // max(V, 1))  # fp32 temporaries of one row block
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s = logits[r0:r1].float()
        if temperature != 1.0:
            s = s / temperature
        elif softcap is not None:
            s = s.clone()  # _cap works in place
        s = _cap(s, softcap)
        m = s.amax(dim=-1, keepdim=True)
        sm = s - m
        e = torch.exp(sm)
        d = e.sum(-1)
        log_d = torch.log(d)
        # Entropy relative to the row max: log d − Σ e·(s − m) / d, no cancellation of two lse-sized terms.
        # e = 0 at −inf logits, where e·(s − m) is 0 (not 0·(−inf)).
        entropy[r0:r1] = log_d - torch.where(e > 0, e * sm, 0.0).sum(-1) / d
        lse[r0:r1] = m.squeeze(-1) + log_d
        tgt = sm.gather(-1, safe[r0:r1].unsqueeze(-1)).squeeze(-1)
        logp[r0:r1] = torch.where(valid[r0:r1], tgt - log_d, torch.zeros_like(log_d))
    return logp, lse, entropy


def vocab_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                   grad_entropy: torch.Tensor | None, temperature: float = 1.0,
                   out: torch.Tensor | None = None, softcap: float | None = None):
    V = logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # Row by row-block so that the fp32 temporaries stay one block big when working in place.
    n = logits.shape[0]
    step = max(1, (1 << 22) // max(V, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        g = grad_logp[r0:r1, None].float()
        o = out[r0:r1]
        if grad_entropy is None and o.dtype == torch.float32 and softcap is None:
            # In place in the fp32 output: p = exp(s - lse), then -g·p (+g at the target), /T.
            torch.sub(logits[r0:r1].float() / temperature if temperature != 1.0 else logits[r0:r1],
                      lse[r0:r1, None], out=o)
            dz = o.exp_().mul_(-g)
        else:
            s = logits[r0:r1].float()
            if temperature != 1.0:
                s = s / temperature
            elif softcap is not None:
                s = s.clone()
            s = _cap(s, softcap)
            p = torch.exp(s - lse[r0:r1, None])
            dz = p * (-g)
            if grad_entropy is not None:
                ge = grad_entropy[r0:r1, None].float()
                dz -= ge * torch.where(p > 0, p * (s - lse[r0:r1, None] + entropy[r0:r1, None]), 0.0)
        t = targets[r0:r1]
        valid = (t >= 0) & (t < V)
        # the one-hot term, without a host synchronization (no nonzero): rows whose target is
        # outside [0, V) add 0 to column 0
        dz.scatter_add_(1, torch.where(valid, t, 0)[:, None], torch.where(valid[:, None], g, 0.0))
        if softcap is not None:  # ds/du = 1 − tanh²(u / softcap)
            dz *= 1.0 - (s / softcap).square_()
        if temperature != 1.0:
            dz /= temperature
        if dz.data_ptr() != o.data_ptr():
            o.copy_(dz)
    return out
