"""LM-head GEMM fused with the vocabulary pass (``backend="fused"``): logits never reach memory.

Computes, for ``z = hidden @ weight.T (+ bias)`` and ``s = z / temperature`` (then
``softcap · tanh(s / softcap)`` with a softcap: a constexpr, so the kernels without it are
unchanged; ``dz`` below then carries the factor ``1 − (s / softcap)²``), the same per-row
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

Backward (``fused_linear_backward``): no atomics, every sum in a fixed order, so the gradients
are bitwise reproducible. The logits are recomputed with exactly the forward's tile code (bitwise
the same ``s``) and give
``dz = (g * (onehot - p) - g_ent * p * (s - lse + entropy)) / temperature`` in fp32.

* Exact (the default, ``filter_eps`` None or 0): waves of ``_wave_rows`` token rows (the dz
  buffer of a wave stays within ``WAVE_BYTES``, 256 MiB, at any N). Per wave one kernel writes the
  wave's dz (rows x V) in the input dtype, plus its fp32 column sums for dbias, and dense GEMMs do
  the rest: ``dhidden[rows] = dz @ W``, ``dweight += dz^T @ hidden[rows]`` (into an fp32 V x H
  buffer for bf16/fp16 weights, or in the weight's dtype with ``accum_fp32=False``: one rounding
  per wave). Cost: one recomputed logits GEMM plus the two gradient GEMMs.
* Filtered (``filter_eps > 0``): a kernel per token tile walking the vocabulary (owns its dhidden
  rows) and a kernel per vocab tile walking the tokens (owns its dweight rows and dbias), both
  recomputing the logits tile and skipping the two dots of a tile whose dz is entirely dropped.
  ``skipped_tile_fraction`` reports how many (token tile, vocab tile) pairs are skipped.

Gradient filtering (``filter_eps``): an element is dropped when
``|dz[r, v]| <= filter_eps * (|g[r]| + |g_ent[r]|) / (temperature * V)``. At most V elements fall
below that, so the mass a row loses is bounded by its gradient scale, whatever the shape of its
softmax (a flat softmax over a large vocabulary keeps its ``-g p`` term):
``sum_{v dropped} |dz[r, v]| <= filter_eps * (|g[r]| + |g_ent[r]|) / temperature``.
The test is element-wise, so which elements are dropped does not depend on the tiling or on the
other rows of the batch, and the result is exactly the gradient of the thresholded ``dz``; its
error against the exact gradient is bounded by the dropped elements:
``|dhidden_f - dhidden|[r, k] <= sum_{v dropped} |dz[r, v]| |W[v, k]|
<= filter_eps * (|g[r]| + |g_ent[r]|) / temperature * max_v |W[v, k]|``,
``|dweight_f - dweight|[v, k] <= sum_{r dropped} |dz[r, v]| |h[r, k]|``,
``|dbias_f - dbias|[v] <= sum_{r dropped} |dz[r, v]|``.
With ``accum_fp32=False`` the filtered kernels round the running dhidden / dweight to the dtype
once per live tile.

Offsets are int64 everywhere (N*V, N*H and V*H may pass 2^31). V, N, H need not be multiples of
the tiles. Targets are in [0, V) (masked positions are taken out before a backend sees them); a
row whose target is outside gets logp = 0 and grad_logp has no effect there. −inf logits (a −inf
bias) have p = 0 and contribute 0 to the entropy and to every gradient, never 0·∞.

On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before import) with small tiles
and two work-arounds for the interpreter's ``tl.dot`` (``INTERP``): the logits tile is an explicit
product-sum (OpenBLAS's sgemm rounds a row differently depending on its position in the tile,
which would hide batch invariance) and the gradient dots upcast bf16/fp16 operands to fp32 (the
interpreter mis-multiplies bf16; the fp32 products of bf16 values are exact, as in the GPU's MMA);
fp32 -> bf16 conversions round to nearest as on the GPU (``_round``: the interpreter truncates).
Batch invariance of the GPU path itself is checked by ``bench/gpu_check_fused.py``. Only Triton
language features of Triton <= 3.6 are used.

The launchers check nothing: the public functions validated every input once (docs/contract.md,
"Public API"); ``splits``, a knob of this module only, is the one argument checked here.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import chunked
from .vocab_triton import softcap_tanh

__all__ = ["fused_linear_forward", "fused_linear_backward", "num_splits", "skipped_tile_fraction"]

# Tile configurations. They may depend on the device type, dtype and Triton version, never on N
# (batch invariance). ptxas allocates registers differently under each Triton, so each table holds
# configurations that compile for sm_80 and sm_90 without register spills under its version
# (`python -m bench.compile_check`, run in CI under Triton 3.6 and the newest). A table serves its
# version and newer ones up to the next table; versions older than the first use the first.
# Triton 3.6 values: measured on an H200 (bench/results/2026-11-27-h200*): at N = 8192,
# H = 4096, V = 151936 bf16 the forward takes 23.5 ms with BLOCK_K = 64 against 34.9 ms with 32.
# "fwd": forward partials; "dz": the exact backward's dz waves; "det": the filtered backward's
# two kernels (one program per token tile for dhidden: small token tiles give enough programs).
# gpu_check_fused.py overwrites the GPU_*_CONFIG dicts to sweep.
def _cfg(n, v, k, warps, stages):
    return {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}


_GPU_TABLES = {
    (3, 6): {"fwd": _cfg(128, 128, 64, 8, 3), "fwd_fp32": _cfg(64, 64, 32, 8, 3),
             "dz": _cfg(128, 64, 64, 8, 3), "dz_fp32": _cfg(64, 64, 32, 8, 2),
             "det": _cfg(64, 128, 32, 8, 3), "det_fp32": _cfg(64, 32, 32, 4, 2)},
    (3, 9): {"fwd": _cfg(128, 64, 32, 8, 3), "fwd_fp32": _cfg(64, 64, 32, 8, 3),
             "dz": _cfg(128, 64, 64, 8, 3), "dz_fp32": _cfg(64, 64, 32, 8, 2),
             "det": _cfg(64, 128, 32, 8, 3), "det_fp32": _cfg(64, 64, 32, 8, 1)},
}


def gpu_tables(version: str | None = None) -> dict:
    """The tile table for Triton ``version`` (default: the installed one)."""
    major_minor = tuple(int(x) for x in (version or triton.__version__).split(".")[:2])
    keys = sorted(_GPU_TABLES)
    return _GPU_TABLES[max([k for k in keys if k <= major_minor], default=keys[0])]


_TABLE = gpu_tables()
GPU_FWD_CONFIG, GPU_FWD_CONFIG_FP32 = dict(_TABLE["fwd"]), dict(_TABLE["fwd_fp32"])
GPU_DZ_CONFIG, GPU_DZ_CONFIG_FP32 = dict(_TABLE["dz"]), dict(_TABLE["dz_fp32"])
GPU_DET_CONFIG, GPU_DET_CONFIG_FP32 = dict(_TABLE["det"]), dict(_TABLE["det_fp32"])
# INTERP: work-arounds for the interpreter's tl.dot (see _mm and _logits_tile).
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1,
                      "INTERP": True}
# Vocab columns per forward split (times BLOCK_V): enough parallelism for small N, few partials.
_TILES_PER_SPLIT = 32
_MAX_SPLITS = 64
_MERGE_BLOCK = 128
# The exact backward's dz buffer per wave of token rows (bytes): bounds its memory at any N.
WAVE_BYTES = 256 * 2 ** 20


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
def _round(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 x rounded to nearest in ``dtype``, as the GPU's conversion does."""
    if INTERP and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16; round to nearest even on the bits first (finite
        # x), after which the truncation is exact.
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                 s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile of s = (h @ W^T + b) * inv_temp, then cap · tanh(s / cap)
    when SOFTCAP; padding rows/cols hold junk."""
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
    acc = acc * inv_temp
    if SOFTCAP:
        acc = softcap_tanh(acc, cap)
    return acc


@triton.jit
def _fwd_partials_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr,
                         N, V, H, v_per_split,
                         s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
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
                         s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                         HAS_BIAS, SOFTCAP, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
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
             inv_temp, cap, filter_eps, HAS_ENT: tl.constexpr, SOFTCAP: tl.constexpr,
             FILTER: tl.constexpr):
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
    if SOFTCAP:
        th = s / cap  # ds/du = 1 − tanh² (≤ 1: the filter's bound below still holds)
        dz = dz * (1.0 - th * th)
    dz = dz * inv_temp
    # where() (not multiply) so that junk in padding rows/cols (possibly inf/nan) cannot leak.
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if FILTER:
        # At most V elements fall below filter_eps * scale / V: a row loses at most filter_eps
        # times its gradient scale in total, whatever the shape of its softmax.
        thr = filter_eps * scale * inv_temp / V
        dz = tl.where(tl.abs(dz) > thr[:, None], dz, 0.0)
    return dz


@triton.jit
def _bwd_dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dz_ptr, dbp_ptr,
                   N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, NEED_DB: tl.constexpr,
                   FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (token tile, vocab tile) of the wave's dz (N, V) in dz's dtype; with NEED_DB also the
    tile's fp32 column sums of dz into row ``program_id(0)`` of dbp (token tiles, V)."""
    pid_n = tl.program_id(0)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                     s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                     HAS_BIAS, SOFTCAP, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                  inv_temp, cap, 0.0, HAS_ENT, SOFTCAP, False)
    tl.store(dz_ptr + rows[:, None] * V + cols[None, :], _round(dz, dz_ptr.dtype.element_ty, INTERP),
             mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.store(dbp_ptr + pid_n.to(tl.int64) * V + cols, tl.sum(dz, axis=0), mask=col_ok)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dh_ptr, live_ptr,
                   N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, cap, filter_eps,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, FILTER: tl.constexpr,
                   STATS: tl.constexpr, FP32_DOT: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token tile; owns dh[rows, :] (zero-initialized), walks V in order. With
    STATS, live[token tile, vocab tile] (fp32) = 1 where the tile's dots run, 0 where skipped."""
    pid_n = tl.program_id(0)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    for v0 in range(0, V, BLOCK_V):
        cols = tl.arange(0, BLOCK_V).to(tl.int64) + v0
        col_ok = cols < V
        s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
                         s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                         HAS_BIAS, SOFTCAP, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                      inv_temp, cap, filter_eps, HAS_ENT, SOFTCAP, FILTER)
        live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
        if STATS:
            tl.store(live_ptr + pid_n.to(tl.int64) * tl.cdiv(V, BLOCK_V) + v0 // BLOCK_V,
                     tl.where(live, 1.0, 0.0))
        if live:
            dzc = _round(dz, h_ptr.dtype.element_ty, INTERP)
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
                   N, V, H, s_hn, s_hk, s_wv, s_wk, inv_temp, cap, filter_eps,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, FILTER: tl.constexpr,
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
                         s_hn, s_hk, s_wv, s_wk, inv_temp, cap,
                         HAS_BIAS, SOFTCAP, FP32_DOT, INTERP, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dz_tile(s, rows, cols, row_ok, col_ok, V, t_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                      inv_temp, cap, filter_eps, HAS_ENT, SOFTCAP, FILTER)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
            if live:
                dzc = tl.trans(_round(dz, h_ptr.dtype.element_ty, INTERP))
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
    """Tile configuration for ``kind`` in ("fwd", "dz", "det"); never a function of N."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    return {"fwd": GPU_FWD_CONFIG_FP32 if fp32 else GPU_FWD_CONFIG,
            "dz": GPU_DZ_CONFIG_FP32 if fp32 else GPU_DZ_CONFIG,
            "det": GPU_DET_CONFIG_FP32 if fp32 else GPU_DET_CONFIG}[kind]


def det_config(cfg: dict, softcap, dtype: torch.dtype) -> dict:
    """The filtered backward's tiles: with a softcap its kernels hold one more tile-sized value
    per element (the tanh factor); bf16/fp16 halve the token tile to stay spill-free
    (``bench.compile_check`` compiles them so; fp32's tiles are small enough already). A function
    of the flag and the dtype only, never of N."""
    if softcap is None or dtype == torch.float32:
        return cfg
    return {**cfg, "BLOCK_N": max(16, cfg["BLOCK_N"] // 2)}


def num_splits(V: int, block_v: int, splits: int | None = None) -> tuple[int, int]:
    """``(splits, columns per split)`` for the forward; a function of V (and the tile) only."""
    if splits is None:
        splits = min(_MAX_SPLITS, max(1, math.ceil(V / (_TILES_PER_SPLIT * block_v))))
    elif not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")
    per = math.ceil(math.ceil(V / splits) / block_v) * block_v
    # Rounding up to whole tiles may leave trailing splits empty: drop them.
    return math.ceil(V / per), per


def _row_vec(t):
    """A per-row (N,) input as the kernels read it: fp32, contiguous, no autograd."""
    return t.detach().to(torch.float32).contiguous()


def fused_linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, temperature: float = 1.0, *,
                         softcap: float | None = None, splits: int | None = None):
    """Per-row log-prob, log-sum-exp and entropy of ``softmax(s)``, ``s = (hidden @ weight.T +
    bias) / T`` (then ``softcap · tanh(s / softcap)`` when softcap is not None).

    hidden (N, H) fp32/bf16/fp16, weight (V, H) same dtype, bias (V,) float or None,
    targets (N,) integer in [0, V). Returns ``(logp, lse, entropy)``, three fp32 (N,) tensors
    (a row whose target is outside [0, V) gets ``logp = 0``). ``splits`` overrides
    the number of vocab splits (default: a function of V only; results depend on it only through
    fp32 rounding, and are bitwise reproducible for a fixed value). No autograd: see
    :func:`fused_linear_backward`.
    """
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
        1.0 / float(temperature), _cap_arg(softcap),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, FP32_DOT=hidden.dtype == torch.float32,
        INTERP=cfg.get("INTERP", False),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _fwd_merge_kernel[(triton.cdiv(N, _MERGE_BLOCK),)](
        part, targets, logp, lse, ent, N, V, S, S * N, BLOCK=_MERGE_BLOCK, num_warps=4)
    return logp, lse, ent


def resolve_filter_eps(filter_eps: float | None) -> float:
    """The threshold actually used: ``None`` -> 0.0 (exact) for every dtype."""
    return 0.0 if filter_eps is None else float(filter_eps)


def _wave_rows(V: int, itemsize: int, block_n: int) -> int:
    """Token rows per backward wave: the dz buffer stays within ``WAVE_BYTES``; a function of V
    and the dtype only, a multiple of the dz kernel's token tile (at least one tile)."""
    return max(block_n, WAVE_BYTES // (V * itemsize) // block_n * block_n)


def _cap_arg(softcap) -> float:
    """The kernels' ``cap`` argument (unused, 1.0, when SOFTCAP is False)."""
    return 1.0 if softcap is None else float(softcap)


def _bwd_args(hidden, weight, temperature, softcap, eps=None):
    N, H = hidden.shape
    return (N, weight.shape[0], H, hidden.stride(0), hidden.stride(1), weight.stride(0),
            weight.stride(1), 1.0 / float(temperature), _cap_arg(softcap)) + \
        (() if eps is None else (eps,))


def _launch(cfg: dict, dtype: torch.dtype, **constexprs) -> dict:
    return dict(FP32_DOT=dtype == torch.float32, INTERP=cfg.get("INTERP", False),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **constexprs)


def fused_linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, lse: torch.Tensor,
                          entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                          grad_entropy: torch.Tensor | None, temperature: float = 1.0, *,
                          softcap: float | None = None, need_hidden: bool = True,
                          need_weight: bool = True, need_bias: bool = True,
                          filter_eps: float | None = None, accum_fp32: bool = True):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` w.r.t. hidden, weight, bias.

    Inputs as :func:`fused_linear_forward`, plus ``lse`` (N,) fp32 from it, ``entropy`` (N,) fp32
    (needed only with ``grad_entropy``), ``grad_logp`` (N,) and ``grad_entropy`` (N,) or None.
    Returns ``(dhidden (N, H) | None, dweight (V, H) | None, dbias (V,) | None)`` in the dtypes of
    hidden, weight and bias; ``need_*`` turn each off (dbias is None when bias is None).
    ``filter_eps``: see the module docstring (None or 0.0 = exact, the default). The backward has
    no atomics and is bitwise reproducible (what the public ``deterministic=True`` asks for). ``accum_fp32=False`` accumulates dweight in its own dtype (no fp32
    V x H buffer).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lse = _row_vec(lse)
    g = _row_vec(grad_logp)
    has_ent = grad_entropy is not None
    assert entropy is not None or not has_ent, "grad_entropy needs entropy"
    if has_ent:
        ge = _row_vec(grad_entropy)
        ent = _row_vec(entropy)
    else:
        ge = ent = lse  # dummy pointers, never read
    eps = resolve_filter_eps(filter_eps)
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
    # fp32 dweight for bf16/fp16 weights only when asked (for fp32 weights it is the gradient).
    acc_w = torch.float32 if accum_fp32 else weight.dtype
    dw = torch.zeros((V, H), dtype=acc_w, device=dev) if need_weight else None
    common = dict(HAS_BIAS=bias is not None, HAS_ENT=has_ent, SOFTCAP=softcap is not None)
    if eps > 0.0:
        dh, db = _filtered_backward(hidden, weight, b, targets, lse, ent, g, ge, temperature,
                                    softcap, eps, dw, need_hidden, need_bias, accum_fp32, common)
    else:
        dh, db = _wave_backward(hidden, weight, b, targets, lse, ent, g, ge, temperature, softcap,
                                dw, need_hidden, need_bias, common)
    return (dh.to(hidden.dtype) if need_hidden else None,
            dw.to(weight.dtype) if need_weight else None,
            db.to(bias.dtype) if need_bias else None)


def _wave_backward(hidden, weight, b, targets, lse, ent, g, ge, temperature, softcap, dw,
                   need_hidden, need_bias, common):
    """Exact backward: per wave of token rows, one kernel writes dz (rows, V) in the GEMM dtype
    (and its column sums in fp32), then dense GEMMs: dh[rows] = dz @ W, dw += dz^T @ h[rows].
    Every sum runs in a fixed order: bitwise reproducible."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = _config(dev, hidden.dtype, "dz")
    R = min(N, _wave_rows(V, hidden.element_size(), cfg["BLOCK_N"]))
    dz = torch.empty((R, V), dtype=hidden.dtype, device=dev)
    dbp = (torch.empty((triton.cdiv(R, cfg["BLOCK_N"]), V), dtype=torch.float32, device=dev)
           if need_bias else lse)
    dh = torch.empty((N, H), dtype=hidden.dtype, device=dev) if need_hidden else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
    opts = _launch(cfg, hidden.dtype, NEED_DB=need_bias, **common)
    for r0 in range(0, N, R):
        n = min(R, N - r0)
        h, z = hidden[r0:r0 + n], dz[:n]
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _bwd_dz_kernel[grid](h, weight, b, targets[r0:], lse[r0:], ent[r0:], g[r0:], ge[r0:],
                             z, dbp, *_bwd_args(h, weight, temperature, softcap), **opts)
        if need_hidden:
            torch.mm(z, weight, out=dh[r0:r0 + n])
        if dw is not None:
            if dw.dtype == h.dtype:
                dw.addmm_(z.t(), h)
            else:
                chunked._addmm_fp32_(dw, z.t(), h)
        if need_bias:
            db += dbp[:grid[0]].sum(0)
    return dh, db


def _filtered_backward(hidden, weight, b, targets, lse, ent, g, ge, temperature, softcap, eps, dw,
                       need_hidden, need_bias, accum_fp32, common):
    """Filtered backward: a dhidden kernel per token tile walking the vocabulary and a dweight /
    dbias kernel per vocab tile walking the tokens, both recomputing the logits tile and skipping
    the dots of a tile whose dz is all below the threshold; each program owns its output rows."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = det_config(_config(dev, hidden.dtype, "det"), softcap, hidden.dtype)
    args = _bwd_args(hidden, weight, temperature, softcap, eps)
    opts = _launch(cfg, hidden.dtype, FILTER=True, **common)
    acc = torch.float32 if accum_fp32 else hidden.dtype
    dh = torch.zeros((N, H), dtype=acc, device=dev) if need_hidden else None
    db = torch.empty(V, dtype=torch.float32, device=dev) if need_bias else None
    if need_hidden:
        _bwd_dh_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hidden, weight, b, targets, lse, ent, g, ge, dh, lse, *args, STATS=False, **opts)
    if dw is not None or need_bias:
        _bwd_dw_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](
            hidden, weight, b, targets, lse, ent, g, ge, dw if dw is not None else hidden,
            db if need_bias else lse, *args, NEED_DW=dw is not None, NEED_DB=need_bias, **opts)
    return dh, db


def skipped_tile_fraction(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                          temperature: float = 1.0, *, softcap: float | None = None,
                          filter_eps: float | None = None) -> float:
    """Fraction of the (token tile, vocab tile) pairs whose gradient dots the filtered backward
    skips (all of the tile's dz below the threshold) at the shipped tiles; 0.0 when exact."""
    N = hidden.shape[0]
    V = weight.shape[0]
    eps = resolve_filter_eps(filter_eps)
    if eps == 0.0 or N == 0:
        return 0.0
    dev = hidden.device
    lse = _row_vec(lse)
    g = _row_vec(grad_logp)
    has_ent = grad_entropy is not None
    assert entropy is not None or not has_ent, "grad_entropy needs entropy"
    ge = _row_vec(grad_entropy) if has_ent else lse
    ent = _row_vec(entropy) if has_ent else lse
    cfg = det_config(_config(dev, hidden.dtype, "det"), softcap, hidden.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    live = torch.empty((grid[0], triton.cdiv(V, cfg["BLOCK_V"])), dtype=torch.float32,
                       device=dev)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
    b = bias.detach().contiguous() if bias is not None else hidden
    _bwd_dh_kernel[grid](hidden.detach(), weight.detach(), b, targets.to(torch.int64).contiguous(),
                         lse, ent, g, ge, dh, live,
                         *_bwd_args(hidden, weight, temperature, softcap, eps),
                         **_launch(cfg, hidden.dtype, HAS_BIAS=bias is not None, HAS_ENT=has_ent, FILTER=True,
                                   STATS=True, SOFTCAP=softcap is not None))
    return 1.0 - live.double().mean().item()
