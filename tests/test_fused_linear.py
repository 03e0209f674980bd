"""The fused GEMM + vocabulary-pass kernels (opo_kernels.fused_linear) against float64 PyTorch.

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU (set by conftest) at small shapes, with V
and N not multiples of the tiles and H not a multiple of BLOCK_K. The reference materializes the
logits in float64 and differentiates them with autograd.
"""
import pytest
import torch

import inspect

from opo_kernels import fused_linear
from opo_kernels.fused_linear import (INTERPRETER_CONFIG,
                                      fused_linear_backward, fused_linear_forward,
                                      resolve_filter_eps, skipped_tile_fraction)

IGNORE = -100


def _inputs(N, H, V, *, bias=True, dtype=torch.float32, scale=1.0, seed=0, device="cpu",
            ignored=(3,)):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * (scale / H ** 0.5)
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    for i in ignored:
        if i < N:
            t[i] = IGNORE
    h, w = h.to(dtype).to(device), w.to(dtype).to(device)
    b = b.to(dtype).to(device) if b is not None else None
    return h, w, b, t.to(device)


def _reference(h, w, b, t, T):
    """fp64 (logp, lse, entropy) and the fp64 leaves, for autograd."""
    hd = h.detach().double().cpu().requires_grad_()
    wd = w.detach().double().cpu().requires_grad_()
    bd = b.detach().double().cpu().requires_grad_() if b is not None else None
    z = hd @ wd.T
    if bd is not None:
        z = z + bd
    s = z / T
    lp_all = torch.log_softmax(s, dim=-1)
    tc = t.cpu()
    valid = (tc >= 0) & (tc < w.shape[0])
    picked = lp_all.gather(1, torch.where(valid, tc, 0)[:, None])[:, 0]
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    lse = torch.logsumexp(s, dim=-1)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    return logp, lse, ent, (hd, wd, bd)


def _reference_grads(h, w, b, t, T, g, ge):
    logp, _, ent, (hd, wd, bd) = _reference(h, w, b, t, T)
    loss = (logp * g.double().cpu()).sum()
    if ge is not None:
        loss = loss + (ent * ge.double().cpu()).sum()
    loss.backward()
    return hd.grad, wd.grad, (bd.grad if bd is not None else None)


def _abs_dz(h, w, b, t, T, g, ge):
    """float64 |d loss / d z| (N, V) of ``sum(g * logp + ge * entropy)``."""
    hd, wd = h.detach().double().cpu(), w.detach().double().cpu()
    z = (hd @ wd.T + (b.detach().double().cpu() if b is not None else 0.0)).requires_grad_()
    lp = torch.log_softmax(z / T, -1)
    tc = t.cpu()
    valid = (tc >= 0) & (tc < w.shape[0])
    logp = torch.where(valid, lp.gather(1, torch.where(valid, tc, 0)[:, None])[:, 0], 0.0)
    loss = (logp * g.double().cpu()).sum()
    if ge is not None:
        loss = loss - (lp.exp() * lp).sum(-1).mul(ge.double().cpu()).sum()
    loss.backward()
    return z.grad.abs()


def _reference_filtered(h, w, b, t, T, g, ge, eps):
    """fp64 gradients of the element-wise thresholded dz, plus the dropped |dz| (for the bound)."""
    hd, wd = h.double().cpu(), w.double().cpu()
    z = hd @ wd.T + (b.double().cpu() if b is not None else 0.0)
    s = z / T
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    tc = t.cpu()
    V = w.shape[0]
    valid = (tc >= 0) & (tc < V)
    gd = torch.where(valid, g.double().cpu(), 0.0)[:, None]
    onehot = torch.zeros_like(p)
    onehot[valid.nonzero()[:, 0], tc[valid]] = 1.0
    dz = gd * (onehot - p)
    scale = gd.abs()
    if ge is not None:
        ged = ge.double().cpu()[:, None]
        ent = lse - (p * s).sum(-1, keepdim=True)
        dz = dz - ged * p * (s - lse + ent)
        scale = scale + ged.abs()
    dz = dz / T
    thr = eps * scale / (T * V)
    keep = dz.abs() > thr
    dropped = torch.where(keep, 0.0, dz.abs())
    # Elements within 1e-4 of the threshold may fall either way in fp32.
    border = torch.where((dz.abs() - thr).abs() <= 1e-4 * thr + 1e-30, dz.abs(), 0.0)
    dzf = torch.where(keep, dz, 0.0)
    return (dzf @ wd, dzf.T @ hd, dzf.sum(0)), dropped, border, keep & (dz != 0)


def _close(a, ref, atol, rtol=0.0, what=""):
    a, ref = a.double().cpu(), ref.double().cpu()
    err = (a - ref).abs()
    lim = atol + rtol * ref.abs()
    assert bool((err <= lim).all()), f"{what}: max err {err.max().item():.3e}"


# ------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("N,H,V,bias,T,splits", [
    (37, 40, 200, True, 1.0, None),
    (37, 40, 200, False, 0.7, 3),
    (20, 16, 50, True, 1.7, 2),
])
def test_forward_matches_fp64(device, N, H, V, bias, T, splits):
    h, w, b, t = _inputs(N, H, V, bias=bias, scale=3.0, device=device)
    logp, lse, ent = fused_linear_forward(h, w, b, t, T, splits=splits)
    rlogp, rlse, rent, _ = _reference(h, w, b, t, T)
    assert logp.dtype == lse.dtype == ent.dtype == torch.float32
    _close(logp, rlogp.detach(), 2e-5, 1e-5, "logp")
    _close(lse, rlse.detach(), 2e-5, 1e-5, "lse")
    _close(ent, rent.detach(), 2e-5, 1e-5, "entropy")
    assert logp[3].item() == 0.0  # ignored target


def test_forward_noncontiguous_and_out_of_range_target(device):
    N, H, V = 24, 40, 50
    h, w, b, t = _inputs(N, 2 * H, V, device=device)
    h, w = h[:, ::2], w[:, ::2]  # strided in the last dim
    t[5] = V + 7
    logp, lse, ent = fused_linear_forward(h, w, b, t, 1.0, splits=2)
    rlogp, rlse, rent, _ = _reference(h, w, b, t, 1.0)
    _close(logp, rlogp.detach(), 2e-5, 1e-5, "logp")
    _close(ent, rent.detach(), 2e-5, 1e-5, "entropy")
    assert logp[5].item() == 0.0 and logp[3].item() == 0.0


def test_forward_bitwise_rerun_and_batch_invariant(device):
    N, H, V = 40, 40, 200
    h, w, b, t = _inputs(N, H, V, scale=2.0, device=device)
    a = fused_linear_forward(h, w, b, t, 0.9, splits=3)
    c = fused_linear_forward(h, w, b, t, 0.9, splits=3)
    for x, y in zip(a, c):
        assert torch.equal(x, y)
    # The same row alone, and inside another batch at another tile position, is bitwise equal.
    for i in (0, 21, 39):
        alone = fused_linear_forward(h[i:i + 1], w, b, t[i:i + 1], 0.9, splits=3)
        for x, y in zip(alone, a):
            assert torch.equal(x[0], y[i]), f"row {i} alone differs"
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1)).to(h.device)
    hp = torch.cat([torch.randn(5, H).to(h), h[perm]])
    tp = torch.cat([torch.zeros(5, dtype=t.dtype, device=t.device), t[perm]])
    mixed = fused_linear_forward(hp, w, b, tp, 0.9, splits=3)
    for x, y in zip(mixed, a):
        assert torch.equal(x[5:], y[perm])


def _upstream(N, seed, device):
    """Upstream gradients ``(g_logp, g_entropy)``: two (N,) fp32 draws of one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)


def test_forward_bf16(device):
    N, H, V = 33, 40, 200
    h, w, b, t = _inputs(N, H, V, dtype=torch.bfloat16, scale=4.0, device=device)
    logp, lse, ent = fused_linear_forward(h, w, b, t, 1.0)
    rlogp, rlse, rent, _ = _reference(h, w, b, t, 1.0)
    # bf16 * bf16 products are exact in fp32; only fp32 accumulation rounding remains.
    _close(logp, rlogp.detach(), 1e-4, 1e-5, "logp")
    _close(lse, rlse.detach(), 1e-4, 1e-5, "lse")
    _close(ent, rent.detach(), 1e-4, 1e-5, "entropy")


# ------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("N,H,V,bias,T,with_ent", [
    (37, 40, 200, True, 1.0, True),
    (37, 40, 200, False, 0.6, False),
    (20, 16, 50, True, 1.5, True),
    (37, 40, 200, True, 1.0, False),
])
def test_backward_exact(device, N, H, V, bias, T, with_ent):
    h, w, b, t = _inputs(N, H, V, bias=bias, scale=2.0, device=device)
    g, ge = _upstream(N, 7, device)  # g nonzero on ignored rows too: must not count
    ge = ge if with_ent else None
    _, lse, ent = fused_linear_forward(h, w, b, t, T)
    dh, dw, db = fused_linear_backward(h, w, b, t, lse, ent, g, ge, T, filter_eps=0.0)
    rdh, rdw, rdb = _reference_grads(h, w, b, t, T, g, ge)
    assert dh.shape == h.shape and dw.shape == w.shape and dh.dtype == h.dtype
    _close(dh, rdh, 1e-5, 1e-4, "dhidden")
    _close(dw, rdw, 1e-5, 1e-4, "dweight")
    if bias:
        _close(db, rdb, 1e-5, 1e-4, "dbias")
    else:
        assert db is None


def test_backward_deterministic_bitwise_and_need_flags(device):
    N, H, V = 37, 40, 200
    h, w, b, t = _inputs(N, H, V, scale=2.0, device=device)
    g = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(device)
    _, lse, ent = fused_linear_forward(h, w, b, t)
    r1 = fused_linear_backward(h, w, b, t, lse, ent, g, g, filter_eps=0.0)
    r2 = fused_linear_backward(h, w, b, t, lse, ent, g, g, filter_eps=0.0)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    only_w = fused_linear_backward(h, w, b, t, lse, ent, g, g, filter_eps=0.0, need_hidden=False,
                                   need_bias=False)
    assert only_w[0] is None and only_w[2] is None and torch.equal(only_w[1], r1[1])
    only_h = fused_linear_backward(h, w, b, t, lse, ent, g, g, filter_eps=0.0,
                                   need_weight=False, need_bias=False)
    assert only_h[1] is None and only_h[2] is None
    _close(only_h[0], r1[0].double(), 1e-6, 1e-5, "dhidden (atomic vs deterministic)")


def test_backward_filtered_within_bound(device):
    # Peaked logits (mean entropy well below log V) so that many elements fall below threshold.
    N, H, V, T, eps = 40, 16, 200, 0.8, 0.2
    h, w, b, t = _inputs(N, H, V, scale=6.0, device=device)
    g, ge = _upstream(N, 11, device)
    ge = ge * 0.3
    _, lse, ent = fused_linear_forward(h, w, b, t, T)
    dh, dw, db = fused_linear_backward(h, w, b, t, lse, ent, g, ge, T, filter_eps=eps)
    (fdh, fdw, fdb), dropped, border, keep = _reference_filtered(h, w, b, t, T, g, ge, eps)
    assert dropped.gt(0).float().mean() > 0.3, "test inputs should exercise the filter"
    wd, hd = w.double().cpu().abs(), h.double().cpu().abs()
    # 1) exactly the gradient of the thresholded dz (up to fp32 rounding and border elements)
    _close(dh, fdh, 1e-5 + (border @ wd), 1e-4, "dhidden vs thresholded")
    _close(dw, fdw, 1e-5 + (border.T @ hd), 1e-4, "dweight vs thresholded")
    _close(db, fdb, 1e-5 + border.sum(0), 1e-4, "dbias vs thresholded")
    # 2) the stated bound against the exact gradient: the dropped elements' contribution
    rdh, rdw, rdb = _reference_grads(h, w, b, t, T, g, ge)
    bound_h, bound_w, bound_b = dropped @ wd, dropped.T @ hd, dropped.sum(0)
    _close(dh, rdh, 1e-5 + bound_h + border @ wd, 1e-4, "dhidden vs exact")
    _close(dw, rdw, 1e-5 + bound_w + border.T @ hd, 1e-4, "dweight vs exact")
    _close(db, rdb, 1e-5 + bound_b + border.sum(0), 1e-4, "dbias vs exact")
    assert (dw.double().cpu() - rdw).abs().max() > 0, "filtering should change something"
    # 3) per row, the dropped mass is at most filter_eps times the row's gradient scale
    scale = (torch.where((t >= 0) & (t < V), g, 0.0).abs() + ge.abs()).double().cpu() / T
    assert bool((dropped.sum(1) <= eps * scale * (1 + 1e-6)).all())
    # 4) the reported fraction of skipped tiles is that of the thresholded dz
    frac = skipped_tile_fraction(h, w, b, t, lse, ent, g, ge, T, filter_eps=eps)
    assert not border.any(), "choose inputs without elements at the threshold"
    bn, bv = INTERPRETER_CONFIG["BLOCK_N"], INTERPRETER_CONFIG["BLOCK_V"]
    kept = torch.nn.functional.pad(keep, (0, -V % bv, 0, -N % bn))
    live = kept.view(kept.shape[0] // bn, bn, -1, bv).any(3).any(1)
    assert frac == pytest.approx(1.0 - live.double().mean().item(), abs=1e-12)
    assert 0.0 < frac < 1.0
    assert skipped_tile_fraction(h, w, b, t, lse, ent, g, ge, T, filter_eps=0.0) == 0.0
    # A threshold above every |dz| drops everything.
    z = fused_linear_backward(h, w, b, t, lse, ent, g, ge, T, filter_eps=1e3)
    assert all(bool((x == 0).all()) for x in z)


def test_backward_bf16_and_accum_modes(device):
    N, H, V = 33, 40, 200
    h, w, b, t = _inputs(N, H, V, dtype=torch.bfloat16, scale=3.0, device=device)
    g, ge = _upstream(N, 5, device)
    _, lse, ent = fused_linear_forward(h, w, b, t)
    rdh, rdw, rdb = _reference_grads(h, w, b, t, 1.0, g, ge)
    for kw in (dict(), dict(accum_fp32=False)):
        dh, dw, db = fused_linear_backward(h, w, b, t, lse, ent, g, ge, filter_eps=0.0, **kw)
        assert dh.dtype == dw.dtype == db.dtype == torch.bfloat16
        # dz is rounded to bf16 for the tensor-core dots (2^-9 relative) and the result to bf16;
        # accum_fp32=False also rounds the running sum to bf16 once per vocab/token tile.
        for x, r, name in ((dh, rdh, "dhidden"), (dw, rdw, "dweight"), (db, rdb, "dbias")):
            _close(x, r, 2e-2 * r.abs().max().item(), 2e-2, f"{name} {kw}")
    # The default is exact for every dtype: bitwise the filter_eps=0.0 result.
    assert resolve_filter_eps(None) == 0.0
    exact = fused_linear_backward(h, w, b, t, lse, ent, g, ge, filter_eps=0.0)
    for x, y in zip(fused_linear_backward(h, w, b, t, lse, ent, g, ge), exact):
        assert torch.equal(x, y)


def test_backward_default_exact_on_flat_softmax(device):
    # p ~ 1/V below 2^-12 everywhere: a per-element threshold at bf16 resolution would drop the
    # whole -g p term; the default keeps every element.
    N, H, V = 24, 16, 4500
    h, w, b, t = _inputs(N, H, V, dtype=torch.bfloat16, scale=0.1, device=device)
    g, ge = _upstream(N, 9, device)
    _, lse, ent = fused_linear_forward(h, w, b, t)
    dh, dw, db = fused_linear_backward(h, w, b, t, lse, ent, g, ge)
    rdh, rdw, rdb = _reference_grads(h, w, b, t, 1.0, g, ge)
    # Per element: dz rounded to bf16 for the dots (unit roundoff u = 2^-8: u |dz| @ |W|), fp32
    # accumulation (far below), the result rounded to bf16 (u |ref|).
    a = _abs_dz(h, w, b, t, 1.0, g, ge)
    u = 2.0 ** -8
    _close(dh, rdh, u * 1.01 * (a @ w.double().cpu().abs()) + 1e-9, u * 1.01, "dhidden")
    _close(dw, rdw, u * 1.01 * (a.T @ h.double().cpu().abs()) + 1e-9, u * 1.01, "dweight")
    _close(db, rdb, 1e-6 * a.sum(0) + 1e-9, u * 1.01, "dbias")


def test_backward_waves_exact_and_bitwise(device, monkeypatch):
    # Waves of 16 token rows (three of them, the last one partial) give the fp32 reference's
    # gradients and the same bits on a rerun.
    N, H, V = 37, 40, 200
    monkeypatch.setattr(fused_linear, "WAVE_BYTES", 16 * V * 4)
    h, w, b, t = _inputs(N, H, V, scale=2.0, device=device)
    g, ge = _upstream(N, 4, device)
    _, lse, ent = fused_linear_forward(h, w, b, t)
    r1 = fused_linear_backward(h, w, b, t, lse, ent, g, ge)
    r2 = fused_linear_backward(h, w, b, t, lse, ent, g, ge)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    for x, r, name in zip(r1, _reference_grads(h, w, b, t, 1.0, g, ge), ("dh", "dw", "db")):
        _close(x, r, 1e-5, 1e-4, name)


def test_backward_has_no_atomics():
    assert "atomic_" not in inspect.getsource(fused_linear)


def test_backward_fp32_accum_false_matches(device):
    N, H, V = 20, 16, 50
    h, w, b, t = _inputs(N, H, V, device=device, scale=2.0)
    g = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    _, lse, ent = fused_linear_forward(h, w, b, t)
    dh, dw, db = fused_linear_backward(h, w, b, t, lse, None, g, None, filter_eps=0.0,
                                       accum_fp32=False)
    rdh, rdw, rdb = _reference_grads(h, w, b, t, 1.0, g, None)
    _close(dh, rdh, 1e-5, 1e-4, "dhidden")
    _close(dw, rdw, 1e-5, 1e-4, "dweight")
    _close(db, rdb, 1e-5, 1e-4, "dbias")


# ------------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_at_the_public_boundary(device):
    # The launchers check nothing; every rule they relied on is checked by the public functions,
    # with backend="fused" as with any other.
    from opo_kernels import linear_logprobs
    h, w, b, t = _inputs(8, 16, 50, device=device)

    def call(h=h, w=w, b=b, t=t, **kw):
        return linear_logprobs(h, w, t, bias=b, backend="fused", **kw)
    with pytest.raises(ValueError, match="weight"):
        call(w=w[:, :8])
    with pytest.raises(TypeError, match="weight"):
        call(w=w.double())
    with pytest.raises(ValueError, match="targets"):
        call(t=t[:4])
    with pytest.raises(TypeError, match="targets"):
        call(t=t.float())
    with pytest.raises(ValueError, match="bias"):
        call(b=b[:3])
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="filter_eps"):
        call(filter_eps=-1.0)
    # splits is the launcher's own knob (no public function takes it): checked where it is read.
    with pytest.raises(ValueError, match="splits"):
        fused_linear_forward(h, w, b, t, splits=0)


def test_gpu_tile_tables_per_triton_version():
    t36, t39 = fused_linear._GPU_TABLES[(3, 6)], fused_linear._GPU_TABLES[(3, 9)]
    assert fused_linear.gpu_tables("3.6.0") is t36
    assert fused_linear.gpu_tables("3.8.1") is t36
    assert fused_linear.gpu_tables("3.9.0") is t39
    assert fused_linear.gpu_tables("3.11.0+git1234") is t39
    assert fused_linear.gpu_tables("3.5.1") is t36  # older than every table: the first
    for table in (t36, t39):
        assert set(table) == {"fwd", "fwd_fp32", "dz", "dz_fp32", "det", "det_fp32"}
