"""The chunked path: the LM-head GEMM one token chunk at a time, then a vocabulary pass.

Never more than one chunk of logits (``chunk × V`` fp32) exists at a time. The loops here are
driven by a :class:`opo_kernels.dispatch.ChunkedBackend` ``be`` (its ``vocab_forward`` /
``vocab_backward``, ``temperature``, ``softcap``, ``chunk`` and chunk schedule ``chunks``):

* :func:`logprobs` / :func:`grads` — the two phases of the differentiable log-prob primitive:
  the forward keeps per-token ``lse`` (and entropy); the backward recomputes each chunk's logits
  (one GEMM more than the floor) and turns them, in place, into ``dz``.
* :func:`one_pass_loss` — a loss whose per-sequence gradient can be formed as soon as every token
  of the sequence has its log-prob (:class:`opo_kernels.losses.LossPlan`). Chunks hold whole
  sequences, so the loss *and* its gradients come out of one pass over the logits (three GEMMs:
  the floor) and backward only scales them — the design of Liger-Kernel's fused-linear losses. A
  sequence longer than the chunk is cut into sub-chunks, still in three GEMMs where the loss
  allows (per-token losses; sequence losses whose token gradients share one scale per sequence),
  else in four (see :func:`one_pass_loss`).

Batch invariance: every logits GEMM runs on exactly :data:`GEMM_ROWS` rows (the last block of
the batch padded with zero rows), whatever the chunk, the batch or the row's position. A BLAS
picks its sgemm kernel, and so its summation order, by the row count; with a fixed count a row's
logits are bitwise the same alone, in any batch and under any ``chunk_size``, so an anchor taken by
:func:`logprobs` gives Δ = 0 exactly inside :func:`one_pass_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# Rows of every logits GEMM: a constant, never a function of the batch. 512 rows keep the CPU
# sgemm at its full-batch speed (N = 1024, H = 512, fp32: 128-row blocks ran 1.07x the
# three-GEMM floor at V = 65536, 512-row blocks 0.99x).
GEMM_ROWS = 512


def default_chunk_tokens(V: int, device: torch.device) -> int:
    """Tokens per logits chunk: at least one GEMM block, more while a fp32 logits chunk stays
    within 64 MiB on CPU or 2 GiB on GPU; a power of two.

    Each chunk re-reads the whole weight in two GEMMs and adds a V × H product into the fp32
    weight gradient, so chunks must not shrink with the vocabulary: with 512-token chunks the
    native backend runs 0.98–1.02x the three-GEMM floor at V = 32000–151936 (N = 1024, H = 512,
    fp32, 2 CPU cores) with a fifth of the materializing loss's memory
    (bench/results/2026-11-27-cpu-vsweep.md).
    On an H200 at V = 151936, H = 4096, N = 8192, 2 GiB chunks took 58 ms where 512 MiB chunks
    took 109 ms (bench/results/2026-11-27-h200-notes.md).
    """
    budget = (64 << 20) if device.type == "cpu" else (2048 << 20)
    rows = max(GEMM_ROWS, budget // (4 * max(V, 1)))
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
        self.upcast = hidden.dtype != torch.float32 and hidden.device.type != "cuda"
        self.w = weight.float() if self.upcast else weight
        self.b = None if bias is None else bias.float()
        self.N = hidden.shape[0]
        self.R = GEMM_ROWS
        # One logits buffer for every chunk (whole GEMM blocks): a fresh chunk-sized allocation
        # per chunk costs its page faults again (on CPU about as much as the vocabulary pass).
        self.rows = self.R * -(-min(chunk, max(self.N, 1)) // self.R)
        self.buf = None
        self.pad = None
        self.dw_fresh = True  # the first weight-gradient GEMM writes instead of accumulating

    def _h(self, a: int, b: int) -> torch.Tensor:
        h = self.hidden[a:b]
        return h.float() if self.upcast else h

    def _block(self, r: int) -> torch.Tensor:
        """Rows [r, r + R) of the GEMM input; past the end of the batch, zero rows."""
        if r + self.R <= self.N:
            return self._h(r, r + self.R)
        if self.pad is None:
            self.pad = self.w.new_zeros(self.R, self.w.shape[1])
        self.pad[:self.N - r].copy_(self._h(r, self.N))
        self.pad[self.N - r:].zero_()
        return self.pad

    def logits(self, a: int, b: int) -> torch.Tensor:
        """fp32 logits of rows [a, b) (b − a ≤ chunk), computed in GEMMs of exactly R rows."""
        n_blocks = -(-(b - a) // self.R)
        if self.buf is None:
            self.buf = torch.empty(self.rows, self.w.shape[0], dtype=torch.float32,
                                   device=self.w.device)
        out = self.buf[:n_blocks * self.R]
        for k in range(n_blocks):
            h = self._block(a + k * self.R)
            o = out[k * self.R:(k + 1) * self.R]
            if h.dtype == torch.float32:
                if self.b is None:
                    torch.mm(h, self.w.t(), out=o)
                else:
                    torch.addmm(self.b, h, self.w.t(), out=o)
            else:
                _mm_fp32_into(o, h, self.w.t())
                if self.b is not None:
                    o += self.b
        return out[:b - a]

    def grad_hidden(self, dz: torch.Tensor, out: torch.Tensor) -> None:
        """out (rows, H) in the input dtype ← dz @ W."""
        if self.w.dtype == out.dtype == dz.dtype:
            torch.mm(dz, self.w, out=out)
        else:
            out.copy_(torch.mm(dz.to(self.w.dtype), self.w))

    def accum_weight(self, dw: torch.Tensor, dz: torch.Tensor, a: int, b: int) -> None:
        """dw (V, H) fp32 (allocated empty) += dzᵀ @ hidden[a:b]."""
        fresh, self.dw_fresh = self.dw_fresh, False
        self.accum_into(dw, dz, a, b, fresh)

    def accum_into(self, dw: torch.Tensor, dz: torch.Tensor, a: int, b: int, fresh: bool) -> None:
        """dw (V, H) fp32 ``=`` (fresh) or ``+=`` dzᵀ @ hidden[a:b]."""
        h = self._h(a, b)
        if h.dtype == torch.float32:
            if fresh:
                torch.mm(dz.t(), h, out=dw)
            else:
                dw.addmm_(dz.t(), h)
        elif fresh:
            _mm_fp32_into(dw, dz.t().to(h.dtype), h)
        else:
            _addmm_fp32_(dw, dz.t().to(h.dtype), h)

    def finish_weight(self, dw: torch.Tensor | None) -> torch.Tensor | None:
        if dw is not None and self.dw_fresh:  # no token at all: the gradient is zero
            dw.zero_()
        return dw


_ADDMM_DTYPE = [True]  # cleared the first time torch refuses addmm(out_dtype=) on this build


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for bf16/fp16 a, b: one GEMM accumulating into the fp32 output where
    torch offers it (CUDA: 4.2 ms instead of 5.4 ms for a 2048-row chunk at V = 151936, H = 4096
    on an H200), else through an fp32 temporary."""
    if _ADDMM_DTYPE[0] and acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_DTYPE[0] = False
    acc += _mm_fp32_out(a, b)


_MM_DTYPE_OUT = [True]  # cleared the first time torch refuses mm(out_dtype=, out=) on this build


def _mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) ← a @ b for bf16/fp16 a, b: the GEMM writes its fp32 result straight into
    ``out`` where torch offers it (CUDA), else through an fp32 temporary."""
    if _MM_DTYPE_OUT[0] and out.is_cuda:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_DTYPE_OUT[0] = False
    out.copy_(_mm_fp32_out(a, b))


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return torch.mm(a.float(), b.float())


# --------------------------------------------------------------------------------------------
# Differentiable log-probs, two phases (the backward recomputes the logits)
# --------------------------------------------------------------------------------------------

def logprobs(be, hidden, weight, bias, targets):
    """(logp, lse, entropy), all (N,) fp32, one chunk of logits at a time."""
    N = hidden.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    head = Head(hidden, weight, bias, be.chunk)
    for t0, t1, _, _ in be.chunks:
        for a, b in sub_chunks(t0, t1, be.chunk):
            if b > a:
                logp[a:b], lse[a:b], ent[a:b] = be.vocab_forward(head.logits(a, b), targets[a:b],
                                                                 be.temperature, be.softcap)
    return logp, lse, ent


def grads(be, hidden, weight, bias, targets, up, needs):
    """(dhidden, dweight, dbias) in the inputs' dtypes, one chunk of logits at a time (``up``:
    :class:`~opo_kernels.dispatch.UpstreamGrad`, ``needs``: :class:`~opo_kernels.dispatch.Needs`)."""
    head = Head(hidden, weight, bias, be.chunk)
    lse, ent, g_logp, g_ent = up.lse, up.entropy, up.g_logp, up.g_ent
    dh = torch.empty_like(hidden) if needs.hidden else None
    dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if needs.weight else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs.bias else None
    for t0, t1, _, _ in be.chunks:
        for a, b in sub_chunks(t0, t1, be.chunk):
            if b <= a:
                continue
            z = head.logits(a, b)
            dz = be.vocab_backward(z, targets[a:b], lse[a:b], None if g_ent is None else ent[a:b],
                                   g_logp[a:b], None if g_ent is None else g_ent[a:b],
                                   be.temperature, out=z, softcap=be.softcap)
            _apply_dz(head, dz, a, b, dh, dw, db)
            del z, dz  # one chunk of logits alive at a time
    dw = head.finish_weight(dw)
    return (dh, None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _apply_dz(head: Head, dz, a, b, dh, dw, db):
    # One cast of fp32 dz to the GEMM dtype (CUDA bf16/fp16) for both GEMMs that read it.
    lo = dz if dz.dtype == head.w.dtype or (dh is None and dw is None) else dz.to(head.w.dtype)
    if dh is not None:
        head.grad_hidden(lo, dh[a:b])
    if dw is not None:
        head.accum_weight(dw, lo, a, b)
    if db is not None:
        db += dz.sum(0)


# --------------------------------------------------------------------------------------------
# Loss and gradients in one pass (chunks of whole sequences)
# --------------------------------------------------------------------------------------------

@dataclass
class LossArgs:
    plan: object           # losses.LossPlan
    targets: torch.Tensor  # (N,) int64, all in [0, V)
    mask: torch.Tensor     # (N,) fp32
    seq: torch.Tensor      # (N,) int64
    old: torch.Tensor | None


def one_pass_loss(be, hidden, weight, bias, la: LossArgs, needs):
    """Loss, metric sums and (when asked: ``needs``, :class:`~opo_kernels.dispatch.Needs`) the
    gradients, one chunk of logits at a time.

    Returns ``loss () fp32, sums (losses.N_SUMS,) fp32, entropy_sum () fp32, dh, dw (fp32), db (fp32)``.

    A chunk of whole sequences takes three GEMMs. A sequence longer than the chunk is cut into
    sub-chunks; how it is handled depends on the loss (``docs/contract.md``, "GEMMs per call"):

    * :attr:`~opo_kernels.losses.LossPlan.piece_separable` (a sum of per-token terms): each
      sub-chunk is its own piece of the loss — three GEMMs;
    * :attr:`~opo_kernels.losses.LossPlan.sequence_scaled` (paper-mode OPO at sequence level,
      GSPO): a token's logit gradient is F_s · c_t · (onehot − p_t) with c_t known from the
      token alone, so each sub-chunk adds c_t-weighted products into the hidden rows and into a
      weight-gradient buffer of the open sequence, which are scaled by F_s once the sequence's Δ
      is complete — three GEMMs;
    * otherwise the sub-chunks' log-probs first, then the sequence's gradient, then the logits of
      each sub-chunk again — four GEMMs.
    """
    plan = la.plan
    head = Head(hidden, weight, bias, be.chunk)
    dev = hidden.device
    from .losses import empty_sums
    acc = _Acc(la, dev, empty_sums(dev))
    g = _Grads(head, hidden, weight, *needs)
    for t0, t1, s0, s1 in be.chunks:
        if t1 == t0:
            continue  # only empty sequences: they take part in nothing
        subs = sub_chunks(t0, t1, be.chunk)
        if len(subs) == 1 or (g.need_any and plan.piece_separable):
            for a, b in subs:
                # A sub-chunk of a long sequence is a piece of it: its tokens are the last
                # sequence's (the others of such a chunk are empty, see plan_chunks). Built on
                # the device without a host copy.
                pieces = None
                if len(subs) > 1:
                    pieces = torch.zeros(s1 - s0, dtype=torch.int64, device=dev)
                    pieces[-1] = b - a
                _chunk_in_one_pass(be, head, acc, g, a, b, s0, s1, pieces)
        elif g.need_any and plan.sequence_scaled:
            _sequence_deferred(be, head, acc, g, subs, t0, t1, s0, s1)
        else:
            _sequence_two_phase(be, head, acc, g, subs, t0, t1, s0, s1)
    return acc.loss, acc.sums, acc.ent_sum, g.dh, head.finish_weight(g.dw), g.db


class _Acc:
    """Loss, metric partial sums and entropy sum over the chunks."""

    def __init__(self, la: LossArgs, dev, sums):
        self.la = la
        self.loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.ent_sum = torch.zeros((), dtype=torch.float32, device=dev)
        self.sums = sums

    def forward(self, be, z, a, b):
        """(logp, lse, entropy) of rows [a, b) from their logits ``z``; adds the entropies."""
        lp, lse, ent = be.vocab_forward(z, self.la.targets[a:b], be.temperature, be.softcap)
        self.ent_sum += (ent * self.la.mask[a:b]).sum()
        return lp, lse, ent

    def loss_grads(self, lp, ent, a, b, s0, s1, lengths, need_any):
        """Adds the loss of tokens [a, b) (sequences [s0, s1)); returns d/d logp and d/d entropy
        (None when nothing needs a gradient; the latter None without an entropy term), in closed
        form (:meth:`~opo_kernels.losses.LossPlan.chunk_grads`)."""
        la, plan = self.la, self.la.plan
        old = None if la.old is None else la.old[a:b]
        args = (lp, old, la.mask[a:b], la.seq[a:b], s0, s1, a, ent, lengths)
        if need_any:
            part, s, gl, ge = plan.chunk_grads(*args)
        else:
            part, s = plan.chunk_loss(*args)
            gl = ge = None
        self.loss += part
        self.sums = plan.combine(self.sums, s)
        return gl, ge


class _Grads:
    """The gradient buffers of one call: dh (N, H) in the input dtype, dw (V, H) fp32, db (V,)
    fp32; and, for a sequence whose scale comes last, the weight-gradient buffer it adds into."""

    def __init__(self, head, hidden, weight, need_h, need_w, need_b):
        dev = hidden.device
        self.head = head
        self.need_any = need_h or need_w or need_b
        self.dh = torch.empty_like(hidden) if need_h else None
        self.dw = torch.empty(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
        self.dw_open = None  # (V, H) fp32, allocated on first use and reused

    def apply(self, dz, a, b):
        _apply_dz(self.head, dz, a, b, self.dh, self.dw, self.db)


def _chunk_in_one_pass(be, head, acc, g, a, b, s0, s1, lengths):
    """Rows [a, b) whose loss is known from their own log-probs: logits once, three GEMMs."""
    z = head.logits(a, b)
    lp, lse, ent = acc.forward(be, z, a, b)
    gl, ge = acc.loss_grads(lp, ent, a, b, s0, s1, lengths, g.need_any)
    if gl is None:
        return
    # the entropy gradient ∂H/∂z = −p ⊙ (log p + H) is formed in the same vocabulary pass
    dz = be.vocab_backward(z, acc.la.targets[a:b], lse, ent if ge is not None else None, gl, ge,
                           be.temperature, out=z, softcap=be.softcap)
    g.apply(dz, a, b)


def _sequence_deferred(be, head, acc, g, subs, t0, t1, s0, s1):
    """One sequence in sub-chunks, d(loss)/d logp_t = F_s · c_t: each sub-chunk's logits once,
    their c_t-weighted products added up, scaled by F_s at the end (three GEMMs)."""
    la, plan = acc.la, acc.la.plan
    lps, cs = [], []
    # The weight gradient of the sequence goes straight into dw when nothing is in it yet (then
    # dw is scaled); else into its own buffer, added to dw scaled.
    into_dw = g.dw is not None and head.dw_fresh
    if g.dw is not None and not into_dw and g.dw_open is None:
        g.dw_open = torch.empty_like(g.dw)
    dw_seq = g.dw if into_dw else g.dw_open
    db_seq = None if g.db is None else torch.zeros_like(g.db)
    fresh = True
    for a, b in subs:
        z = head.logits(a, b)
        lp, lse, _ = acc.forward(be, z, a, b)
        lps.append(lp)
        # on-policy (no old log-probs), the anchor of the importance weights is lp itself
        ct = plan.token_coef(lp.detach() if la.old is None else la.old[a:b], la.mask[a:b], a)
        cs.append(ct)
        dz = be.vocab_backward(z, la.targets[a:b], lse, None, ct.contiguous(), None,
                               be.temperature, out=z, softcap=be.softcap)
        lo = dz if dz.dtype == head.w.dtype else dz.to(head.w.dtype)  # one cast, two GEMMs
        if g.dh is not None:
            head.grad_hidden(lo, g.dh[a:b])
        if dw_seq is not None:
            head.accum_into(dw_seq, lo, a, b, fresh)
            fresh = False
        if db_seq is not None:
            db_seq += dz.sum(0)
        del z, dz, lo
    lp = torch.cat(lps)
    gl, _ = acc.loss_grads(lp, lp, t0, t1, s0, s1, None, True)
    # g_t = F_s · c_t for every token, c_t ≥ 0: F_s is read off the sums (0 if no c_t > 0).
    sc = torch.cat(cs).sum()
    F = torch.where(sc > 0, gl.sum() / sc.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    if g.dh is not None:
        g.dh[t0:t1].mul_(F.to(g.dh.dtype))
    if dw_seq is not None:
        if into_dw:
            head.dw_fresh = False
            g.dw.mul_(F)
        else:
            g.dw.addcmul_(g.dw_open, F)
    if db_seq is not None:
        g.db.addcmul_(db_seq, F)


def _sequence_two_phase(be, head, acc, g, subs, t0, t1, s0, s1):
    """One sequence in sub-chunks, any loss: the log-probs of every sub-chunk, then the
    sequence's gradient, then each sub-chunk's logits again (four GEMMs)."""
    la = acc.la
    lps, lses, ents = [], [], []
    for a, b in subs:
        z = head.logits(a, b)
        lp, lse, ent = acc.forward(be, z, a, b)
        lps.append(lp)
        lses.append(lse)
        ents.append(ent)
        del z
    lp, ent = torch.cat(lps), torch.cat(ents)
    gl, ge = acc.loss_grads(lp, ent, t0, t1, s0, s1, None, g.need_any)
    if gl is None:
        return
    for k, (a, b) in enumerate(subs):
        z = head.logits(a, b)
        dz = be.vocab_backward(z, la.targets[a:b], lses[k], ents[k] if ge is not None else None,
                               gl[a - t0:b - t0].contiguous(),
                               ge[a - t0:b - t0].contiguous() if ge is not None else None,
                               be.temperature, out=z, softcap=be.softcap)
        g.apply(dz, a, b)
        del z, dz
