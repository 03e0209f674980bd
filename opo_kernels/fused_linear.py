"""LM-head GEMM fused with the vocabulary pass (``backend="fused"``): logits never reach memory.

Computes, for ``z = hidden @ weight.T (+ bias)`` and ``s = z / temperature``, the same per-row
quantities as the vocabulary pass of :mod:`opo_kernels.vocab_torch` (lse, target log-prob,
entropy) and their gradients with respect to hidden, weight and bias, without ever writing a
[tokens x vocab] block to global memory: each program computes a ``BLOCK_N x BLOCK_V`` tile of
logits with ``tl.dot`` into an fp32 accumulator and consumes it in registers.

Forward (``fused_linear_forward``), two kernels, no atomics:

* grid (token tiles, vocab splits). A program walks its split's vocab range tile by tile and
  keeps, per row, the running max ``m``, ``d = sum exp(s - m)``, ``t = sum exp(s - m) * (s - m)``
  (rescaled whenever ``m`` grows) and the target logit if the target falls in its range. These four
  fp32 numbers per (split, token) go to a ``(4, splits, N)`` buffer.
* a merge kernel combines the splits of each row in split order (fixed), giving
  ``lse = M + log D``, ``entropy = log D - T / D`` (relative to the merged max ``M``, so no
  cancellation of ``lse - E[s]`` for large logits) and ``logp = s[target] - lse``.
* Tile sizes depend only on the device type and dtype, and the number of splits only on V, never
  on N: the tile of logits that row ``i`` sees is computed by the same instructions whatever the
  other rows of its tile are, so a row's results are bitwise identical alone or in any batch, and
  a rerun (the anchor pass) reproduces them exactly (on-policy delta = 0).

Backward (``fused_linear_backward``): each tile recomputes its logits with exactly the forward's
code (bitwise the same ``s``), forms
``dz = (g * (onehot - p) - g_ent * p * (s - lse + entropy)) / temperature`` in fp32, and
accumulates ``dhidden += dz @ W_tile``, ``dweight_tile += dz^T @ h_tile``, ``dbias += sum dz``
(dz is rounded to the input dtype for the two tensor-core dots; accumulation in fp32).

* ``deterministic=False`` (default, with ``accum_fp32=True``): one kernel over
  (token tiles x vocab tiles), fp32 ``tl.atomic_add`` into fp32 buffers of the gradients.
* ``deterministic=True`` or ``accum_fp32=False``: two kernels without atomics, one per token tile
  walking the vocabulary (dhidden rows owned by the program), one per vocab tile walking the tokens
  (dweight rows and dbias owned by the program); each read-modify-writes its own rows in vocab /
  token order, so the result is bitwise reproducible. With ``accum_fp32=False`` the
  read-modify-write goes straight into the gradient tensors in their dtype (no fp32 copy of
  dweight: saves V*H*4 bytes, costs one rounding to the dtype per live tile).

Gradient filtering (``filter_eps``): an element is dropped when
``|dz[r, v]| <= filter_eps * (|g[r]| + |g_ent[r]|) / temperature``, i.e. when its contribution is
below ``filter_eps`` relative to the row's gradient scale; a tile whose elements are all dropped
skips both gradient dots (and, for a peaked softmax, that is almost every tile). Because the test
is element-wise, which elements are dropped does not depend on the tiling or on the other rows of
the batch, and the result is exactly the gradient of the thresholded ``dz``; the error against the
exact gradient is bounded by the dropped elements:
``|dhidden_f - dhidden|[r, k] <= sum_{v dropped} |dz[r, v]| |W[v, k]|``,
``|dweight_f - dweight|[v, k] <= sum_{r dropped} |dz[r, v]| |h[r, k]|``,
``|dbias_f - dbias|[v] <= sum_{r dropped} |dz[r, v]|``.
``filter_eps=None`` means ``finfo(dtype).eps / 32`` (bf16: 2^-12 = ``DEFAULT_FILTER_EPS``, fp16:
2^-15), a single element below 1/32 of a bf16 ulp of a gradient entry at the row's scale (the same
threshold as cut-cross-entropy's "auto"); fp32 inputs default to exact. ``filter_eps=0.0`` is exact
(no filtering). Note the bound is per element: a flat softmax over a large vocabulary (p ~ 1/V
everywhere, below the threshold) loses its whole ``-g p`` term, whose sum ``-g E_p[W]`` is small
only when the dropped rows of W are incoherent; use exact mode for such inputs.
``accum_fp32=False`` rounds the running dhidden to the dtype once per live vocab tile, so it is
meant for filtered mode, where few tiles per row are live.

Offsets are int64 everywhere (N*V, N*H and V*H may pass 2^31). V, N, H need not be multiples of
the tiles. Targets are in [0, V) (masked positions are taken out before a backend sees them); a
row whose target is outside gets logp = 0 and grad_logp has no effect there. −inf logits (a −inf
bias) have p = 0 and contribute 0 to the entropy and to every gradient, never 0·∞.

On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before import) with small tiles
and two work-arounds for the interpreter's ``tl.dot`` (``INTERP``): the logits tile is an explicit
product-sum (OpenBLAS's sgemm rounds a row differently depending on its position in the tile,
which would hide batch invariance) and the gradient dots upcast bf16/fp16 operands to fp32 (the
interpreter mis-multiplies bf16; the fp32 products of bf16 values are exact, as in the GPU's MMA).
Batch invariance of the GPU path itself is checked by ``bench/gpu_check_fused.py``. Only Triton
language features of Triton <= 3.6 are used.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import checks

__all__ = ["fused_linear_forward", "fused_linear_backward", "DEFAULT_FILTER_EPS", "num_splits"]

DEFAULT_FILTER_EPS = 2.0 ** -12

# Tile configurations. They may depend on the device type and dtype, never on N (batch invariance).
# GPU values: measured on an H200 with Triton 3.6 (bench/results/2026-11-27-h200*), among the
# configurations that compile for sm_80 and sm_90 under Triton 3.6 without register spills
# (`python -m bench.compile_check`). At N = 8192, H = 4096, V = 151936 bf16 the forward takes
# 23.5 ms with BLOCK_K = 64 against 34.9 ms with 32; larger tiles (128 x 256, 64 x 128 x 64 with 4
# warps for the backward) measured up to 1.5x faster still but spill, and are not shipped.
# gpu_check_fused.py overwrites these dicts to sweep.
GPU_FWD_CONFIG = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
GPU_FWD_CONFIG_FP32 = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 32, "num_warps": 8,
                       "num_stages": 3}
GPU_BWD_CONFIG = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
GPU_BWD_CONFIG_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
# The atomic-free backward has one program per token tile for dhidden: smaller token tiles give
# the GPU enough programs at moderate N.
GPU_DET_CONFIG = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
GPU_DET_CONFIG_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
# INTERP: work-arounds for the interpreter's tl.dot (see _mm and _logits_tile).
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1,
                      "INTERP": True}
# Vocab columns per forward split (times BLOCK_V): enough parallelism for small N, few partials.
_TILES_PER_SPLIT = 32
_MAX_SPLITS = 64
_MERGE_BLOCK = 128


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, acc, FP32_DOT: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b in fp32."""
    if INTERP:
        # The interpreter mis-multiplies bf16 operands; fp32 copies give the same exact products
        # with fp32 accumulation that the GPU's bf16 MMA gives.
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_DOT:
        # fp32 inputs must not silently drop to tf32 (fp32 accuracy, docs/contract.md).
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                 s_hn, s_hk, s_wv, s_wk, inv_temp,
                 HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile of s = (h @ W^T + b) * inv_temp; padding rows/cols hold junk."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        hb = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if INTERP:
            # The interpreter's tl.dot is an OpenBLAS sgemm whose rounding depends on a row's
            # position in the tile; an explicit product-sum keeps rows independent, as the GPU's
            # MMA instructions do (batch invariance is tested under the interpreter).
            acc += tl.sum(hb.to(tl.float32)[:, None, :] * wb.to(tl.float32)[None, :, :], axis=2)
        else:
            acc = _mm(hb, tl.trans(wb), acc, FP32_DOT, INTERP)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    return acc * inv_temp


@triton.jit
def _fwd_partials_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr,
                         N, V, H, v_per_split,
                         s_hn, s_hk, s_wv, s_wk, inv_temp,
                         HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    S = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    # V < 2^31, so the column bounds stay int32; offsets are made int64 below.
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    d = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Every tile of the loop starts below v_end, so it holds at least one real column and m is
    # finite after the first tile.
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = tl.arange(0, BLOCK_V).to(tl.int64) + v0
        col_ok = cols < v_end
        s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                         s_hn, s_hk, s_wv, s_wk, inv_temp,
                         HAS_BIAS, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        zt += tl.sum(tl.where(hit, s, 0.0), axis=1)
        # Padding columns get a huge finite negative logit: exp gives 0.
        s = s + tl.where(col_ok, 0.0, -1.0e30)[None, :]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Real logits may be -inf (a -inf bias), so may the running max: every product below is
        # guarded so that 0 * (-inf) never happens (d == 0 exactly while m = -inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_ref))
        shift = d * tl.where(d > 0.0, m - m_ref, 0.0)
        s = s - m_ref[:, None]
        e = tl.exp(s)
        t = alpha * (t + shift) + tl.sum(tl.where(e > 0.0, e * s, 0.0), axis=1)
        d = alpha * d + tl.sum(e, axis=1)
        m = m_new

    base = part_ptr + pid_s.to(tl.int64) * N + rows
    plane = S.to(tl.int64) * N
    tl.store(base, m, mask=row_ok)
    tl.store(base + plane, d, mask=row_ok)
    tl.store(base + 2 * plane, t, mask=row_ok)
    tl.store(base + 3 * plane, zt, mask=row_ok)


@triton.jit
def _fwd_merge_kernel(part_ptr, t_ptr, logp_ptr, lse_ptr, ent_ptr, N, V, S, plane,
                      BLOCK: tl.constexpr):
    # Offsets advance by pointer increments (64-bit) rather than split * N products in int32.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    big_m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    p = part_ptr + rows
    for _sp in range(0, S):
        big_m = tl.maximum(big_m, tl.load(p, mask=row_ok, other=0.0))
        p += N
    d = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    zt = tl.zeros((BLOCK,), dtype=tl.float32)
    # Fixed split order: the merged numbers are a function of the row alone.
    p = part_ptr + rows
    for _sp in range(0, S):
        m_s = tl.load(p, mask=row_ok, other=0.0)
        d_s = tl.load(p + plane, mask=row_ok, other=0.0)
        t_s = tl.load(p + 2 * plane, mask=row_ok, other=0.0)
        zt += tl.load(p + 3 * plane, mask=row_ok, other=0.0)
        w = tl.exp(m_s - big_m)
        d += w * d_s
        # A split whose logits are all -inf has d_s = 0 and m_s = -inf: it adds nothing.
        t += tl.where(d_s > 0.0, w * (t_s + (m_s - big_m) * d_s), 0.0)
        p += N
    d = tl.where(row_ok, d, 1.0)  # padding rows: keep log(0) out
    log_d = tl.log(d)
    lse = big_m + log_d
    ent = log_d - t / d
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    valid = (tgt >= 0) & (tgt < V)
    logp = tl.where(valid, zt - lse, 0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    tl.store(logp_ptr + rows, logp, mask=row_ok)


@triton.jit
def _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
             inv_temp, filter_eps, HAS_ENT: tl.constexpr, FILTER: tl.constexpr):
    """fp32 dz tile (zero outside the matrix and, when FILTER, below the row's threshold)."""
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    # The forward returns logp = 0 (a constant) for rows whose target is outside [0, V), so
    # grad_logp has no effect there.
    g = tl.where((tgt >= 0) & (tgt < V), g, 0.0)
    p = tl.exp(s - lse[:, None])
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    scale = tl.abs(g)
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        # p == 0 at -inf logits, whose (s - lse + H) is -inf: their gradient is 0, not nan.
        dz -= ge[:, None] * tl.where(p > 0.0, p * (s - lse[:, None] + ent[:, None]), 0.0)
        scale += tl.abs(ge)
    dz = dz * inv_temp
    # where() (not multiply) so that junk in padding rows/cols (possibly inf/nan) cannot leak.
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if FILTER:
        thr = filter_eps * scale * inv_temp
        dz = tl.where(tl.abs(dz) > thr[:, None], dz, 0.0)
    return dz


@triton.jit
def _bwd_atomic_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                       dh_ptr, dw_ptr, db_ptr,
                       N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, filter_eps,
                       HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, FILTER: tl.constexpr,
                       NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Token tiles vary fastest, so concurrently running programs share the same W tile in L2.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                     s_hn, s_hk, s_wv, s_wk, inv_temp,
                     HAS_BIAS, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                  inv_temp, filter_eps, HAS_ENT, FILTER)
    live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
    if live:
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
        if NEED_DH or NEED_DW:
            dzc = dz.to(h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                if NEED_DH:
                    wb = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                                 mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    dh = _mm(dzc, wb, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32),
                             FP32_DOT, INTERP)
                    tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh,
                                  mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
                if NEED_DW:
                    hb = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    dw = _mm(tl.trans(dzc), hb, tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32),
                             FP32_DOT, INTERP)
                    tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw,
                                  mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dh_ptr,
                   N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, filter_eps,
                   HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, FILTER: tl.constexpr,
                   FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token tile; owns dh[rows, :] (zero-initialized), walks V in order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    for v0 in range(0, V, BLOCK_V):
        cols = tl.arange(0, BLOCK_V).to(tl.int64) + v0
        col_ok = cols < V
        s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                         s_hn, s_hk, s_wv, s_wk, inv_temp,
                         HAS_BIAS, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                      inv_temp, filter_eps, HAS_ENT, FILTER)
        live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
        if live:
            dzc = dz.to(h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                wb = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                ptrs = dh_ptr + rows[:, None] * H + ks[None, :]
                msk = row_ok[:, None] & k_ok[None, :]
                cur = tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
                cur = _mm(dzc, wb, cur, FP32_DOT, INTERP)
                tl.store(ptrs, cur.to(dh_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dw_ptr, db_ptr,
                   N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, filter_eps,
                   HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, FILTER: tl.constexpr,
                   NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per vocab tile; owns dw[cols, :] (zero-initialized) and db[cols]."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = tl.arange(0, BLOCK_N).to(tl.int64) + n0
        row_ok = rows < N
        s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                         s_hn, s_hk, s_wv, s_wk, inv_temp,
                         HAS_BIAS, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                      inv_temp, filter_eps, HAS_ENT, FILTER)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
            if live:
                dzc = tl.trans(dz.to(h_ptr.dtype.element_ty))
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < H
                    hb = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    ptrs = dw_ptr + cols[:, None] * H + ks[None, :]
                    msk = col_ok[:, None] & k_ok[None, :]
                    cur = tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
                    cur = _mm(dzc, hb, cur, FP32_DOT, INTERP)
                    tl.store(ptrs, cur.to(dw_ptr.dtype.element_ty), mask=msk)
    if NEED_DB:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _config(device: torch.device, dtype: torch.dtype, kind: str) -> dict:
    """Tile configuration for ``kind`` in ("fwd", "bwd", "det"); never a function of N."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    return {"fwd": GPU_FWD_CONFIG_FP32 if fp32 else GPU_FWD_CONFIG,
            "bwd": GPU_BWD_CONFIG_FP32 if fp32 else GPU_BWD_CONFIG,
            "det": GPU_DET_CONFIG_FP32 if fp32 else GPU_DET_CONFIG}[kind]


def num_splits(V: int, block_v: int, splits: int | None = None) -> tuple[int, int]:
    """``(splits, columns per split)`` for the forward; a function of V (and the tile) only."""
    if splits is None:
        splits = min(_MAX_SPLITS, max(1, math.ceil(V / (_TILES_PER_SPLIT * block_v))))
    elif not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")
    per = math.ceil(math.ceil(V / splits) / block_v) * block_v
    # Rounding up to whole tiles may leave trailing splits empty: drop them.
    return math.ceil(V / per), per


def _check_inputs(hidden, weight, bias, targets, temperature):
    checks.check_linear(hidden, weight, bias, targets)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    checks.check_triton_device(hidden.device, "backend='fused'")
    checks.check_positive("temperature", temperature)


def _row_vec(name, t, N, device):
    return checks.check_rows(name, t, N, device).detach().to(torch.float32)


def fused_linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, temperature: float = 1.0, *,
                         splits: int | None = None):
    """Per-row log-prob, log-sum-exp and entropy of ``softmax((hidden @ weight.T + bias) / T)``.

    hidden (N, H) fp32/bf16/fp16, weight (V, H) same dtype, bias (V,) float or None,
    targets (N,) integer in [0, V). Returns ``(logp, lse, entropy)``, three fp32 (N,) tensors
    (a row whose target is outside [0, V) gets ``logp = 0``). ``splits`` overrides
    the number of vocab splits (default: a function of V only; results depend on it only through
    fp32 rounding, and are bitwise reproducible for a fixed value). No autograd: see
    :func:`fused_linear_backward`.
    """
    _check_inputs(hidden, weight, bias, targets, temperature)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, lse, ent
    hidden, weight = hidden.detach(), weight.detach()
    targets = targets.detach().to(torch.int64).contiguous()
    b = bias.detach().contiguous() if bias is not None else hidden  # dummy pointer
    cfg = _config(dev, hidden.dtype, "fwd")
    S, per = num_splits(V, cfg["BLOCK_V"], splits)
    part = torch.empty((4, S, N), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), S)
    _fwd_partials_kernel[grid](
        hidden, weight, b, targets, part, N, V, H, per,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / float(temperature),
        HAS_BIAS=bias is not None, FP32_DOT=hidden.dtype == torch.float32,
        INTERP=cfg.get("INTERP", False),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _fwd_merge_kernel[(triton.cdiv(N, _MERGE_BLOCK),)](
        part, targets, logp, lse, ent, N, V, S, S * N, BLOCK=_MERGE_BLOCK, num_warps=4)
    return logp, lse, ent


def resolve_filter_eps(filter_eps: float | None, dtype: torch.dtype) -> float:
    """The threshold actually used: ``None`` -> finfo(dtype).eps / 32 for bf16/fp16, 0 for fp32."""
    checks.check_filter_eps(filter_eps)
    if filter_eps is None:
        return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 32
    return float(filter_eps)


def fused_linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, lse: torch.Tensor,
                          entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                          grad_entropy: torch.Tensor | None, temperature: float = 1.0, *,
                          need_hidden: bool = True,
                          need_weight: bool = True, need_bias: bool = True,
                          filter_eps: float | None = None, deterministic: bool = False,
                          accum_fp32: bool = True):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` w.r.t. hidden, weight, bias.

    Inputs as :func:`fused_linear_forward`, plus ``lse`` (N,) fp32 from it, ``entropy`` (N,) fp32
    (needed only with ``grad_entropy``), ``grad_logp`` (N,) and ``grad_entropy`` (N,) or None.
    Returns ``(dhidden (N, H) | None, dweight (V, H) | None, dbias (V,) | None)`` in the dtypes of
    hidden, weight and bias; ``need_*`` turn each off (dbias is None when bias is None).
    ``filter_eps``: see the module docstring (None = dtype default, 0.0 = exact).
    ``deterministic``: atomic-free two-kernel path, bitwise reproducible. ``accum_fp32=False``
    accumulates in the gradients' own dtype (no fp32 V x H buffer; uses the atomic-free path).
    """
    _check_inputs(hidden, weight, bias, targets, temperature)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lse = _row_vec("lse", lse, N, dev)
    g = _row_vec("grad_logp", grad_logp, N, dev)
    checks.check_entropy_for_grad(entropy, grad_entropy)
    has_ent = grad_entropy is not None
    if has_ent:
        ge = _row_vec("grad_entropy", grad_entropy, N, dev)
        ent = _row_vec("entropy", entropy, N, dev)
    else:
        ge = ent = lse  # dummy pointers, never read
    eps = resolve_filter_eps(filter_eps, hidden.dtype)
    need_bias = need_bias and bias is not None
    hidden, weight = hidden.detach(), weight.detach()
    targets = targets.detach().to(torch.int64).contiguous()
    b = bias.detach().contiguous() if bias is not None else hidden

    if N == 0:
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    if not (need_hidden or need_weight or need_bias):
        return None, None, None

    cfg = _config(dev, hidden.dtype, "det" if (deterministic or not accum_fp32) else "bwd")
    common = dict(HAS_BIAS=bias is not None, HAS_ENT=has_ent, FILTER=eps > 0.0,
                  FP32_DOT=hidden.dtype == torch.float32, INTERP=cfg.get("INTERP", False),
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    args = (N, V, H, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / float(temperature), eps)
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    acc_h = torch.float32 if accum_fp32 else hidden.dtype
    acc_w = torch.float32 if accum_fp32 else weight.dtype
    acc_b = torch.float32 if (accum_fp32 or bias is None) else bias.dtype
    dh = torch.zeros((N, H), dtype=acc_h, device=dev) if need_hidden else None
    dw = torch.zeros((V, H), dtype=acc_w, device=dev) if need_weight else None
    if deterministic or not accum_fp32:
        db = torch.empty(V, dtype=acc_b, device=dev) if need_bias else None
        if need_hidden:
            _bwd_dh_kernel[(n_tiles,)](hidden, weight, b, targets, lse, ent, g, ge, dh,
                                       *args, **common)
        if need_weight or need_bias:
            _bwd_dw_kernel[(v_tiles,)](hidden, weight, b, targets, lse, ent, g, ge,
                                       dw if need_weight else hidden, db if need_bias else lse,
                                       *args, NEED_DW=need_weight, NEED_DB=need_bias, **common)
    else:
        db = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
        _bwd_atomic_kernel[(n_tiles, v_tiles)](
            hidden, weight, b, targets, lse, ent, g, ge,
            dh if need_hidden else lse, dw if need_weight else lse, db if need_bias else lse,
            *args, NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias, **common)
    return (dh.to(hidden.dtype) if need_hidden else None,
            dw.to(weight.dtype) if need_weight else None,
            db.to(bias.dtype) if need_bias else None)
