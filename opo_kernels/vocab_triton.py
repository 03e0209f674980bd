"""The vocabulary pass as two Triton kernels (``backend="triton"``).

Same contract as :mod:`opo_kernels.vocab_torch` (read its docstring): ``vocab_forward`` gives
per-row fp32 ``logp``, ``lse`` and ``entropy`` of ``s = logits / temperature`` (then
``softcap · tanh(s / softcap)`` with a softcap); ``vocab_backward`` writes
``dz = (g_logp * (onehot - p) - g_ent * p * (s - lse + entropy)) · ds/du / temperature`` into
``out``, which may be ``logits`` itself.

Design:

* One program per row, looping over V in ``BLOCK_V`` columns. The forward keeps three fp32
  scalars: the running max ``m``, ``d = sum exp(s - m)`` and ``t = sum exp(s - m) * (s - m)``, all
  rescaled when ``m`` grows, so lse, the target logit and the entropy come out of one read of the
  row. Keeping ``t`` relative to ``m`` gives ``entropy = log d - t / d`` without the cancellation of
  ``lse - E[s]`` when logits are large.
* A row's result depends only on that row and on ``BLOCK_V``, which depends only on V and the
  device type, never on the number of rows: the forward is deterministic and independent of the
  batch composition (the anchor pass reproduces the policy pass bit for bit).
* Row offsets are computed in int64 (``row * stride`` can pass 2^31 elements); column offsets
  stay int32 (V < 2^31).
* Logits are loaded in their own dtype (fp32/bf16/fp16) and upcast in registers; the backward
  stores in ``out``'s dtype. Rows need not be contiguous in dim 0; only the last dim must be.
* On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before this module is
  imported). The interpreter runs programs one after the other in numpy, so there the block is
  large (fewer Python-level iterations).

Only Triton language features available in Triton 3.2-3.6 are used.

These launchers run once per chunk of logits and check nothing: the public functions validated
every input once (docs/contract.md, "Public API"), so a direct caller passes valid tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


_GPU_MAX_BLOCK = 4096
_INTERPRETER_MAX_BLOCK = 16384


@triton.jit
def softcap_tanh(u, cap):
    """``cap · tanh(u / cap)`` in fp32 from one exp (no libdevice: the same code on every Triton
    and in the interpreter): tanh(a) = (1 − e^(−2a)) / (1 + e^(−2a)) for a = |u| / cap ≥ 0, so no
    overflow; ±inf give ±cap. Absolute error a few fp32 ulps of ``cap``."""
    e = tl.exp(-2.0 * (tl.abs(u) / cap))
    r = cap * ((1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -r, r)


@triton.jit
def _vocab_forward_kernel(
    logits_ptr, stride_row, targets_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    V, inv_temp, cap,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)

    # Scalars start from a 0-d reduction so their type is fixed (fp32 tensors) across the loop.
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
    m = zero - float("inf")
    d = zero
    t = zero
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        if SOFTCAP:
            # padding columns stay -inf (the cap would make them -cap)
            x = tl.where(mask, softcap_tanh(x, cap), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Guards for rows that are -inf so far (padding columns masked with -inf): keep them
        # from turning into inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_ref))
        shift = d * tl.where(d > 0.0, m - m_ref, 0.0)
        xm = x - m_ref
        e = tl.exp(xm)
        t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, xm, 0.0), axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        m = m_new

    log_d = tl.log(d)
    lse = m + log_d
    entropy = log_d - t / d

    tgt = tl.load(targets_ptr + row).to(tl.int64)
    valid = (tgt >= 0) & (tgt < V)
    safe_tgt = tl.where(valid, tgt, 0)
    x_t = tl.load(row_ptr + safe_tgt).to(tl.float32) * inv_temp
    if SOFTCAP:
        x_t = softcap_tanh(x_t, cap)
    logp = tl.where(valid, x_t - lse, 0.0)

    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, entropy)


@triton.jit
def _vocab_backward_kernel(
    logits_ptr, stride_row, out_ptr, stride_out_row, targets_ptr,
    lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    V, inv_temp, cap,
    HAS_ENTROPY_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_row_ptr = out_ptr + row.to(tl.int64) * stride_out_row
    cols = tl.arange(0, BLOCK_V)

    tgt = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_logp_ptr + row).to(tl.float32)
    if HAS_ENTROPY_GRAD:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
        # d entropy / d s = -p * (s - lse + entropy); fold the constant part per row.
        ent_shift = tl.load(entropy_ptr + row) - lse

    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        if SOFTCAP:
            s = softcap_tanh(s, cap)
        p = tl.exp(s - lse)
        dz = -g * p
        if HAS_ENTROPY_GRAD:
            # p == 0 for -inf logits, whose (s - lse + H) is -inf: their gradient is 0, not NaN.
            dz -= g_ent * p * tl.where(p > 0.0, s + ent_shift, 0.0)
        # An out-of-range target matches no column in [0, V), so no validity test is needed.
        dz += tl.where(offs.to(tl.int64) == tgt, g, 0.0)
        if SOFTCAP:
            th = s / cap  # ds/du = 1 − tanh²
            dz = dz * (1.0 - th * th)
        dz = dz * inv_temp
        tl.store(out_row_ptr + offs, dz.to(out_ptr.dtype.element_ty), mask=mask)


# Whether the kernels were built for the interpreter: decided once, when they were decorated.
INTERPRETED = type(_vocab_forward_kernel).__name__ == "InterpretedFunction"


def _block_and_warps(V: int, device: torch.device, block_v: int | None):
    if block_v is not None:
        if not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a positive power of two, got {block_v!r}")
        block = block_v
    else:
        cap = _GPU_MAX_BLOCK if device.type == "cuda" else _INTERPRETER_MAX_BLOCK
        block = min(triton.next_power_of_2(V), cap)
    # 16 fp32 elements per thread at most: enough loads in flight without spilling registers.
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


def vocab_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  softcap: float | None = None, *, block_v: int | None = None):
    """Per-row log-prob of the target, log-sum-exp and entropy of ``s = logits / temperature``
    (then ``softcap · tanh(s / softcap)`` when softcap is not None).

    logits  (n, V) fp32/bf16/fp16, CUDA (or CPU under TRITON_INTERPRET=1); rows may be strided,
            a non-contiguous last dim is copied.
    targets (n,) integer in [0, V) (a target outside gives logp = 0).
    block_v optional power-of-two block width (tests use it to force several blocks per row).
    Returns ``(logp, lse, entropy)``, three fp32 (n,) tensors.
    """
    n, V = logits.shape
    targets = targets.contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()

    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp)
    if n == 0:
        return logp, lse, entropy
    block, num_warps = _block_and_warps(V, logits.device, block_v)
    _vocab_forward_kernel[(n,)](
        logits, logits.stride(0), targets, logp, lse, entropy, V, 1.0 / temperature,
        1.0 if softcap is None else float(softcap),
        SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=num_warps,
    )
    return logp, lse, entropy


def vocab_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                   grad_entropy: torch.Tensor | None, temperature: float = 1.0,
                   out: torch.Tensor | None = None, softcap: float | None = None, *,
                   block_v: int | None = None):
    """Write the gradient w.r.t. logits of ``sum(g_logp * logp + g_ent * entropy)`` into ``out``.

    logits       (n, V) fp32/bf16/fp16 (as in :func:`vocab_forward`)
    targets      (n,) integer; rows with a target outside [0, V) get no one-hot term
    lse          (n,) fp32 from :func:`vocab_forward` (same temperature)
    entropy      (n,) fp32 or None; needed when ``grad_entropy`` is given
    grad_logp    (n,) float
    grad_entropy (n,) float or None (no entropy gradient: the kernel skips that term)
    out          (n, V) float tensor on logits' device, or None for a new tensor of logits' dtype;
                 may be ``logits`` itself (each element is read before it is written, by the same
                 program). Written in its own dtype.
    Returns ``out``.
    """
    n, V = logits.shape
    device = logits.device
    has_ent = grad_entropy is not None
    assert entropy is not None or not has_ent, "grad_entropy needs entropy"
    # Row vectors as the kernel indexes them: contiguous (a no-op for what the backends pass).
    targets, lse, grad_logp = targets.contiguous(), lse.contiguous(), grad_logp.contiguous()
    if has_ent:
        grad_entropy, entropy = grad_entropy.contiguous(), entropy.contiguous()
    if out is None:
        out = torch.empty((n, V), dtype=logits.dtype, device=device)
    if n == 0:
        return out

    # A non-contiguous last dim is computed into a scratch buffer; if logits is copied, an
    # in-place request (out is logits) still ends in the caller's tensor through the copy_.
    dst = out if out.stride(1) == 1 else torch.empty((n, V), dtype=out.dtype, device=device)
    src = logits if logits.stride(1) == 1 else logits.contiguous()

    block, num_warps = _block_and_warps(V, device, block_v)
    _vocab_backward_kernel[(n,)](
        src, src.stride(0), dst, dst.stride(0), targets,
        lse, entropy if has_ent else lse, grad_logp, grad_entropy if has_ent else grad_logp,
        V, 1.0 / temperature, 1.0 if softcap is None else float(softcap),
        HAS_ENTROPY_GRAD=has_ent, SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=num_warps,
    )
    if dst is not out:
        out.copy_(dst)
    return out
