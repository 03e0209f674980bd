"""The fused-linear chunked path: LM-head GEMM per token chunk + the vocabulary pass.

Never more than one chunk of logits (``chunk_tokens × V`` fp32) exists at a time. Two autograd
functions live here:

* :class:`LinearLogprobsFunction` — the differentiable primitive ``hidden, weight -> logp, entropy``.
  Forward keeps only per-token ``lse`` (and entropy); backward recomputes each chunk's logits
  (one GEMM more than the floor) and turns them, in place, into ``dz``.
* :class:`FusedPolicyLossFunction` — a loss whose per-sequence gradient can be formed as soon as every
  token of the sequence has its log-prob (:class:`opo_kernels.losses.LossPlan`). Chunks hold whole
  sequences, so the forward computes the loss *and* its gradients in one pass over the logits
  (three GEMMs: the floor) and backward only scales them by the incoming gradient — the design
  Liger-Kernel's fused-linear losses use. A sequence longer than the chunk is cut into
  sub-chunks: their log-probs first (keeping ``lse``), then the sequence's gradient, then the
  logits of each sub-chunk again (two-phase, for that sequence only).

Both walk the same chunk schedule for the same input layout, and no GEMM ever sees fewer than
``MIN_GEMM_ROWS`` rows (BLAS kernels for tiny M accumulate in another order), so an anchor taken
with :class:`LinearLogprobsFunction` gives Δ = 0 exactly inside
:class:`FusedPolicyLossFunction`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dispatch

MIN_GEMM_ROWS = 16


def default_chunk_tokens(V: int, device: torch.device) -> int:
    """Token-chunk size from the vocabulary: a fp32 logits chunk of ≤ 64 MiB on CPU, 512 MiB on GPU.

    On CPU each chunk re-reads the whole weight in two GEMMs, so fewer, larger chunks are
    faster; 64 MiB keeps the peak above inputs and gradients at a fifth of a materializing loss
    at the CPU headline shape (bench/results).
    """
    budget = (64 << 20) if device.type == "cpu" else (512 << 20)
    rows = max(MIN_GEMM_ROWS, budget // (4 * max(V, 1)))
    return 1 << (rows.bit_length() - 1)


def plan_chunks(lengths: list[int], chunk: int) -> list[tuple[int, int, int, int]]:
    """Greedy packing of whole sequences into chunks of ≤ ``chunk`` tokens.

    lengths: tokens per sequence, in order. Returns ``(t0, t1, s0, s1)``: tokens [t0, t1) are all
    the tokens of sequences [s0, s1). A sequence longer than ``chunk`` gets a chunk of its own
    (processed in sub-chunks by the caller).
    """
    out = []
    t0 = t = 0
    s0 = 0
    for s, n in enumerate(lengths):
        if t > t0 and t + n - t0 > chunk:
            out.append((t0, t, s0, s))
            t0, s0 = t, s
        t += n
    if t > t0 or s0 < len(lengths):
        out.append((t0, t, s0, len(lengths)))
    return out


def sub_chunks(t0: int, t1: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, t1)) for a in range(t0, t1, chunk)] or [(t0, t1)]


class Head:
    """The LM head in the dtype the GEMMs run in; fp32 logits whatever the input dtype.

    On CPU, bf16/fp16 inputs are upcast (CPU has no bf16 GEMM with fp32 output); on CUDA the
    GEMM runs in the input dtype with an fp32 result (``out_dtype``) where torch offers it.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 chunk: int):
        self.hidden = hidden
        self.dtype = hidden.dtype
        self.upcast = hidden.dtype != torch.float32 and hidden.device.type != "cuda"
        self.w = weight.float() if self.upcast else weight
        self.b = None if bias is None else bias.float()
        self.N = hidden.shape[0]
        # One logits buffer for every chunk: a fresh chunk-sized allocation per chunk costs its
        # page faults again (on CPU about as much as the vocabulary pass itself).
        self.rows = max(MIN_GEMM_ROWS, min(chunk, self.N))
        self.buf = None
        self.dw_fresh = True  # the first weight-gradient GEMM writes instead of accumulating

    def _h(self, a: int, b: int) -> torch.Tensor:
        h = self.hidden[a:b]
        return h.float() if self.upcast else h

    def logits(self, a: int, b: int) -> torch.Tensor:
        """fp32 logits of rows [a, b), computed on at least MIN_GEMM_ROWS rows."""
        w0 = a
        if b - a < MIN_GEMM_ROWS and self.N >= MIN_GEMM_ROWS:
            w0 = max(0, min(a, self.N - MIN_GEMM_ROWS))
        w1 = max(b, min(self.N, w0 + MIN_GEMM_ROWS))
        h = self._h(w0, w1)
        if h.shape[0] < MIN_GEMM_ROWS:  # a tiny batch: pad with zero rows to the same GEMM shape
            h = torch.cat([h, h.new_zeros(MIN_GEMM_ROWS - h.shape[0], h.shape[1])])
        if h.dtype == torch.float32:
            if h.shape[0] <= self.rows:
                if self.buf is None:
                    self.buf = h.new_empty(self.rows, self.w.shape[0])
                out = self.buf[:h.shape[0]]
            else:
                out = h.new_empty(h.shape[0], self.w.shape[0])
            if self.b is None:
                z = torch.mm(h, self.w.t(), out=out)
            else:
                z = torch.addmm(self.b, h, self.w.t(), out=out)
        else:
            z = _mm_fp32_out(h, self.w.t())
            if self.b is not None:
                z += self.b
        return z[a - w0:b - w0]

    def grad_hidden(self, dz: torch.Tensor, out: torch.Tensor) -> None:
        """out (rows, H) in the input dtype ← dz @ W."""
        if self.w.dtype == out.dtype == dz.dtype:
            torch.mm(dz, self.w, out=out)
        else:
            out.copy_(torch.mm(dz.to(self.w.dtype), self.w))

    def accum_weight(self, dw: torch.Tensor, dz: torch.Tensor, a: int, b: int) -> None:
        """dw (V, H) fp32 (allocated empty) += dzᵀ @ hidden[a:b]."""
        h = self._h(a, b)
        fresh, self.dw_fresh = self.dw_fresh, False
        if h.dtype == torch.float32:
            if fresh:
                torch.mm(dz.t(), h, out=dw)
            else:
                dw.addmm_(dz.t(), h)
        elif fresh:
            dw.copy_(_mm_fp32_out(dz.t().to(h.dtype), h))
        else:
            dw += _mm_fp32_out(dz.t().to(h.dtype), h)

    def finish_weight(self, dw: torch.Tensor | None) -> torch.Tensor | None:
        if dw is not None and self.dw_fresh:  # no token at all: the gradient is zero
            dw.zero_()
        return dw


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return torch.mm(a.float(), b.float())


@dataclass
class VocabArgs:
    temperature: float
    ignore_index: int
    backend: str
    chunk: int
    chunks: list  # from plan_chunks
    filter_eps: float | None = None  # backend="fused": gradient filtering threshold (0 = exact)
    deterministic: bool = False      # backend="fused": atomics-free backward


# --------------------------------------------------------------------------------------------
# Differentiable log-probs (two-phase: the backward recomputes logits)
# --------------------------------------------------------------------------------------------

def logprobs_forward(hidden, weight, bias, targets, va: VocabArgs):
    """(logp, lse, entropy), all (N,) fp32, one chunk of logits at a time."""
    if va.backend == "fused":
        from .fused_linear import fused_linear_forward
        return fused_linear_forward(hidden, weight, bias, targets, va.temperature, va.ignore_index)
    N = hidden.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    vf, _ = dispatch.vocab_pass(va.backend)
    head = Head(hidden, weight, bias, va.chunk)
    for t0, t1, _, _ in va.chunks:
        for a, b in sub_chunks(t0, t1, va.chunk):
            if b > a:
                logp[a:b], lse[a:b], ent[a:b] = vf(head.logits(a, b), targets[a:b], va.temperature,
                                                   va.ignore_index)
    return logp, lse, ent


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, va: VocabArgs):
        logp, lse, ent = logprobs_forward(hidden, weight, bias, targets, va)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.va = va
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        va = ctx.va
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        # Ignored rows have a constant log-prob of 0: whatever gradient arrives there is dropped.
        ok = (targets >= 0) & (targets < weight.shape[0])
        g_logp = torch.where(ok, g_logp.float(), 0.0).contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        if va.backend == "fused":
            from .fused_linear import fused_linear_backward
            dh, dw, db = fused_linear_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                                               va.temperature, va.ignore_index, need_hidden=need_h,
                                               need_weight=need_w, need_bias=need_b and bias is not None,
                                               filter_eps=va.filter_eps, deterministic=va.deterministic)
            return dh, dw, db, None, None
        _, vb = dispatch.vocab_pass(va.backend)
        head = Head(hidden, weight, bias, va.chunk)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if (need_b and bias is not None) else None
        for t0, t1, _, _ in va.chunks:
            for a, b in sub_chunks(t0, t1, va.chunk):
                if b <= a:
                    continue
                z = head.logits(a, b)
                dz = vb(z, targets[a:b], lse[a:b], ent[a:b] if g_ent is not None else None,
                        g_logp[a:b], None if g_ent is None else g_ent[a:b], va.temperature,
                        va.ignore_index, out=z)
                _apply_dz(head, dz, a, b, dh, dw, db)
                del z, dz  # one chunk of logits alive at a time
        dw = head.finish_weight(dw)
        return (dh, None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None)


def _apply_dz(head: Head, dz, a, b, dh, dw, db):
    if dh is not None:
        head.grad_hidden(dz, dh[a:b])
    if dw is not None:
        head.accum_weight(dw, dz, a, b)
    if db is not None:
        db += dz.sum(0)


# --------------------------------------------------------------------------------------------
# Loss and gradients in one pass (chunks of whole sequences)
# --------------------------------------------------------------------------------------------

@dataclass
class LossArgs:
    va: VocabArgs
    plan: object          # losses.LossPlan
    targets: torch.Tensor  # (N,) int64
    mask: torch.Tensor     # (N,) fp32
    seq: torch.Tensor      # (N,) int64
    old: torch.Tensor | None


def fused_loss(hidden, weight, bias, la: LossArgs, need_h: bool, need_w: bool, need_b: bool):
    """Loss, metric sums and (when asked) the gradients, one chunk of logits at a time.

    Returns ``loss () fp32, sums (4,) fp32, entropy_sum () fp32, dh, dw (fp32), db (fp32)``.
    """
    va, plan = la.va, la.plan
    vf, vb = dispatch.vocab_pass(va.backend)
    head = Head(hidden, weight, bias, va.chunk)
    dev = hidden.device
    need_any = need_h or need_w or need_b
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    sums = torch.zeros(4, dtype=torch.float32, device=dev)
    ent_sum = torch.zeros((), dtype=torch.float32, device=dev)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.empty(weight.shape, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
    for t0, t1, s0, s1 in va.chunks:
        if t1 == t0:
            continue  # only empty sequences: they take part in nothing
        subs = sub_chunks(t0, t1, va.chunk)
        keep = len(subs) == 1  # one sub-chunk: its logits stay for the backward
        lps, lses, zs = [], [], []
        for a, b in subs:
            z = head.logits(a, b)
            lp, lse, ent = vf(z, la.targets[a:b], va.temperature, va.ignore_index)
            ent_sum += (ent * la.mask[a:b]).sum()
            lps.append(lp)
            lses.append(lse)
            if keep:
                zs.append(z)
            del z
        lp = lps[0] if keep else torch.cat(lps)
        old = None if la.old is None else la.old[t0:t1]
        with torch.enable_grad():
            x = lp.detach().requires_grad_(need_any)
            part, s = plan.chunk_loss(x, old, la.mask[t0:t1], la.seq[t0:t1], s0, s1)
        loss += part.detach()
        sums += s
        if not need_any:
            continue
        g = torch.autograd.grad(part, x, allow_unused=True)[0] if part.requires_grad else None
        if g is None:
            g = torch.zeros_like(lp)
        for k, (a, b) in enumerate(subs):
            z = zs[0] if keep else head.logits(a, b)
            dz = vb(z, la.targets[a:b], lses[k], None, g[a - t0:b - t0].contiguous(), None,
                    va.temperature, va.ignore_index, out=z)
            _apply_dz(head, dz, a, b, dh, dw, db)
            del z, dz
        # Drop this chunk's logits before the next chunk allocates its own: one chunk alive.
        del zs
    return loss, sums, ent_sum, dh, head.finish_weight(dw), db


class FusedPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, la: LossArgs):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, sums, ent_sum, dh, dw, db = fused_loss(hidden, weight, bias, la, need_h, need_w, need_b)
        if dw is not None and weight.dtype != torch.float32:
            dw = dw.to(weight.dtype)
        if db is not None and bias.dtype != torch.float32:
            db = db.to(bias.dtype)
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(sums, ent_sum)
        return loss, sums, ent_sum

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_ent):
        dh, dw, db = ctx.saved_tensors
        # The gradients were formed for d(loss) = 1; scale only when the caller's weight is not 1.
        unit = g_loss.device.type == "cpu" and g_loss.item() == 1.0
        out = []
        for t in (dh, dw, db):
            out.append(t if (t is None or unit) else t * g_loss.to(t.dtype))
        return out[0], out[1], out[2], None
