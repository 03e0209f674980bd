"""Logit scaling and soft-capping (``logit_scale``, ``softcap``) on every backend.

The logits a policy samples from are ``s = c·tanh(scale·z / c) / T`` (``scale·z / T`` without a
softcap), z = hidden @ weight.T + bias. Each backend's log-probs, entropies, losses and the
gradients w.r.t. hidden, weight and bias are compared with float64 autograd through that formula
(written here, independently of opo_kernels), with per-element tolerances derived in
:func:`_bounds` from the fp32 (and bf16) roundings of the computation.
"""
import math

import pytest
import torch

import reference
from reference import backends, single_thread  # noqa: F401  (fixture)

from opo_kernels import FusedPolicyLoss, fused_opo_loss, fused_policy_loss, linear_logprobs

U = 2.0 ** -24  # fp32 unit roundoff
UB = 2.0 ** -8  # bf16 unit roundoff (2^-9), doubled: one rounding of a value and one of a result
H, V, B, T = 16, 70, 3, 6  # V spans several (and a partial) fused vocabulary tiles
BACKENDS = backends("torch", "native", "triton", "fused", "reference")
CAPS, SCALES, TEMPS = (None, 2.0, 30.0), (1.0, 0.0625, 3.0), (1.0, 0.7)


def _transform(z, scale, cap, temp):
    """float64 s of float64 z (the public formula, scale → cap → temperature)."""
    if cap is None:
        return scale * z / temp
    return cap * torch.tanh(scale * z / cap) / temp


def _inputs(dtype, seed=0):
    """(hidden (B, T, H), weight, bias, targets (B, T), mask (B, T)); masked positions hold NaN
    hidden states and out-of-range targets (they must take part in nothing). Logits reach ±10,
    so a softcap of 2 saturates for some."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.8).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    tg = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = False
    h[~mask] = float("nan")
    return h, w, b, tg, mask


def _reference(h, w, b, tg, mask, scale, cap, temp):
    """float64 leaves and their (logp, entropy) of the valid positions (0 elsewhere)."""
    hd = torch.where(mask[..., None], h.double(), 0.0).requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    s = _transform(hd @ wd.t() + bd, scale, cap, temp)
    lsm = torch.log_softmax(s, -1)
    lp = lsm.gather(-1, tg.clamp(0, V - 1)[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return (hd, wd, bd), torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)


def _bounds(h, w, b, tg, mask, scale, cap, temp, dtype, gl, ge, hess=None):
    """Per-element bounds on |backend − float64| for logp, entropy, dh, dw, db (first order in u).

    The fp32 logits z_tj = Σ_k h_tk w_jk + b_j are within (H + 2)·u·(Σ_k |h_tk w_jk| + |b_j|)
    (bf16 inputs: their products are exact in fp32, but the chunked backends round z to bf16:
    + u_bf16·|z|); u = z / (T / scale) adds 4u|u| (the division and the folded temperature);
    tanh (from one exp in the Triton kernels) adds 8u·k + 4u|s| with k = c / T, and |ds/du| ≤ 1.
    With δ_t the largest error of row t's s and σ_t = u·(V + 4 + 2|lse_t| + 4·max_j |s_tj|) the
    rounding of its sums: |Δlse| ≤ δ + σ, |Δlogp| ≤ 2(δ + σ), |ΔH| ≤ 2H·δ + 2σ (∂H/∂s_j =
    −p_j(s_j − lse + H) and Σ_j p_j |log p_j + H| ≤ 2H). The logit gradient dz_tj = c_tj/t·(g_t(1[j
    = target] − p_j) − e_t p_j(s_j − lse + H)) (c = 1 − (s/k)², t = T / scale) has magnitude
    G_tj; p moves relatively by 2(δ + σ), (s − lse + H) by (2H + 3)δ + 3σ, c by 2δ/k + 4u; with a
    loss, g and e move by its |Hessian| times the log-prob/entropy bounds. dh, dw, db sum V, N, N
    products of dz with W or h: + 2·(V or N)·u·Σ|terms|; bf16 rounds dz and the result: + 2u_bf16.
    """
    hd = torch.where(mask[..., None], h.double(), 0.0).reshape(-1, H)
    wd, bd = w.double(), b.double()
    z = hd @ wd.t() + bd
    t = temp / scale
    k = None if cap is None else cap / temp
    dz_abs = (hd.abs() @ wd.abs().t() + bd.abs()) * (H + 2) * U
    if dtype != torch.float32:
        dz_abs = dz_abs + UB * z.abs()
    u = z / t
    s = _transform(z, scale, cap, temp)
    ds = dz_abs / t + 4 * U * u.abs()
    if k is not None:
        ds = ds + 8 * U * k + 4 * U * s.abs()
    delta = ds.amax(-1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[:, None])
    ent = lse - (p * s).sum(-1)
    sigma = U * (V + 4 + 2 * lse.abs() + 4 * s.abs().amax(-1))
    b_lp = 2 * (delta + sigma)
    b_ent = 2 * ent * delta + 2 * sigma
    ga, ea = gl.abs(), ge.abs()
    dga = dea = torch.zeros_like(ga)
    if hess is not None:  # the loss's derivatives move with its inputs
        d = hess.abs() @ torch.cat([b_lp, b_ent])
        dga, dea = d[:ga.numel()], d[ga.numel():]
    onehot = torch.zeros_like(p)
    flat = tg.reshape(-1)
    ok = mask.reshape(-1)
    onehot[ok.nonzero().squeeze(1), flat[ok]] = 1.0
    c = torch.ones_like(s) if k is None else 1.0 - (s / k) ** 2
    dev = (s - lse[:, None] + ent[:, None]).abs() + 1

    def mag(a, e):
        return (a[:, None] * (onehot + p) + e[:, None] * p * dev) / t

    G0 = mag(ga, ea)
    G = c * G0
    D = 2 * (delta + sigma) + (2 * ent + 3) * delta + 3 * sigma + 4 * U
    E = G * D[:, None] + c * mag(dga, dea)
    if k is not None:
        E = E + G0 * (2 * delta[:, None] / k + 4 * U)
    W, Hh = wd.abs(), hd.abs()
    N = hd.shape[0]
    r = UB * 2 if dtype != torch.float32 else 0.0
    b_dh = E @ W + (2 * V * U + r) * (G @ W)
    b_dw = E.t() @ Hh + (2 * N * U + r) * (G.t() @ Hh)
    b_db = E.sum(0) + (2 * N * U + r) * G.sum(0)
    return b_lp, b_ent, b_dh, b_dw, b_db


def _check(name, got, ref, bound):
    got, ref = got.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    bound = bound.reshape(-1)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements beyond the bound, worst error "
                           f"{err[bad].max().item():.3e} vs bound {bound[bad].min().item():.3e}")


def _grid():
    cases = [(cap, scale, temp, torch.float32) for cap in CAPS for scale in SCALES
             for temp in TEMPS]
    cases += [(2.0, 3.0, 0.7, torch.bfloat16), (30.0, 0.0625, 1.0, torch.bfloat16),
              (None, 3.0, 0.7, torch.bfloat16), (5.0, 1.0, 1.0, torch.bfloat16)]
    return cases


def _ids(c):
    return f"cap{c[0]}-scale{c[1]}-T{c[2]}-{str(c[3]).split('.')[-1]}"


@pytest.mark.parametrize("case", _grid(), ids=[_ids(c) for c in _grid()])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_entropy_and_grads(device, backend, case):
    _logprobs_case(device, backend, case)


FILTER_EPS = 1e-9


@pytest.mark.parametrize("case", [(2.0, 3.0, 0.7, torch.float32), (30.0, 0.0625, 1.0, torch.bfloat16)],
                         ids=_ids)
def test_fused_filtered_backward(device, case):
    """The fused backend's filtered kernels (``filter_eps`` > 0, own-dtype accumulation) with the
    transform: within the bound plus the filter's (each dropped |dz| ≤ ε·(|g| + |e|)/(t·V))."""
    _logprobs_case(device, "fused", case, filter_eps=FILTER_EPS, accum_fp32=False)


def _logprobs_case(device, backend, case, **backend_options):
    cap, scale, temp, dtype = case
    h, w, b, tg, mask = _inputs(dtype)
    (hd, wd, bd), rlp, rent = _reference(h, w, b, tg, mask, scale, cap, temp)
    gen = torch.Generator().manual_seed(5)
    gl = torch.randn(B * T, generator=gen, dtype=torch.float64) * mask.reshape(-1)
    ge = torch.randn(B * T, generator=gen, dtype=torch.float64) * mask.reshape(-1)
    ((rlp.reshape(-1) * gl).sum() + (rent.reshape(-1) * ge).sum()).backward()

    hx, wx, bx = (x.to(device).requires_grad_() for x in (h, w, b))
    targets = torch.where(mask, tg, -100).to(device)
    lp, ent = linear_logprobs(hx, wx, targets, bias=bx, temperature=temp, logit_scale=scale,
                              softcap=cap, return_entropy=True, backend=backend, **backend_options)
    ((lp.reshape(-1).double() * gl.to(device)).sum()
     + (ent.reshape(-1).double() * ge.to(device)).sum()).backward()

    b_lp, b_ent, b_dh, b_dw, b_db = _bounds(h, w, b, tg, mask, scale, cap, temp, dtype, gl, ge)
    eps = backend_options.get("filter_eps")
    if eps:  # the dropped elements: at most V per row, each ≤ thr_t = ε·(|g_t| + |e_t|)/(t·V)
        thr = eps * (gl.abs() + ge.abs()) * scale / temp / V
        hd_ = torch.where(mask[..., None], h.double(), 0.0).reshape(-1, H)
        b_dh = b_dh + (V * thr)[:, None] * w.double().abs().amax(0)[None, :]
        b_dw = b_dw + thr @ hd_.abs()
        b_db = b_db + thr.sum()
    _check("logp", lp.cpu(), rlp, b_lp)
    _check("entropy", ent.cpu(), rent, b_ent)
    assert bool((lp.cpu()[~mask] == 0).all()) and bool((ent.cpu()[~mask] == 0).all())
    _check("dhidden", hx.grad.cpu(), hd.grad, b_dh)
    assert bool((hx.grad.cpu()[~mask] == 0).all())
    _check("dweight", wx.grad.cpu(), wd.grad, b_dw)
    _check("dbias", bx.grad.cpu(), bd.grad, b_db)


LOSS_CASES = [(2.0, 3.0, 0.7, torch.float32), (30.0, 0.0625, 1.0, torch.bfloat16),
              (None, 3.0, 1.0, torch.float32), (5.0, 1.0, 0.7, torch.float32)]


@pytest.mark.parametrize("case", LOSS_CASES, ids=[_ids(c) for c in LOSS_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss(device, backend, case):
    """The OPO loss with an entropy bonus (one pass on the chunked backends) against float64."""
    cap, scale, temp, dtype = case
    h, w, b, tg, mask = _inputs(dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(B, generator=gen)
    with torch.no_grad():
        _, rlp0, _ = _reference(h, w, b, tg, mask, scale, cap, temp)
    old = torch.where(mask, rlp0 + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64),
                      0.0).float()
    opts = dict(entropy_coef=0.01)
    valid = mask.reshape(-1).double()

    def loss_of(x):
        n = B * T
        return reference.policy_loss(x[:n], old.reshape(-1).double(), adv, valid, [T] * B,
                                     loss="opo", entropy=x[n:], vocab_size=V, **opts)[0]

    (hd, wd, bd), rlp, rent = _reference(h, w, b, tg, mask, scale, cap, temp)
    x = torch.cat([rlp.reshape(-1), rent.reshape(-1)])
    rloss = loss_of(x)
    rloss.backward()
    xd = x.detach().requires_grad_()
    g = torch.autograd.grad(loss_of(xd), xd)[0]
    hess = torch.autograd.functional.hessian(loss_of, x.detach())

    hx, wx, bx = (t_.to(device).requires_grad_() for t_ in (h, w, b))
    loss, metrics = fused_opo_loss(hx, wx, tg.to(device), adv.to(device), old.to(device),
                                   mask.to(device), bias=bx, temperature=temp, logit_scale=scale,
                                   softcap=cap, backend=backend, **opts)
    loss.backward()
    b_lp, b_ent, b_dh, b_dw, b_db = _bounds(h, w, b, tg, mask, scale, cap, temp, dtype,
                                            g[:B * T], g[B * T:], hess)
    b_loss = (g.abs() * torch.cat([b_lp, b_ent])).sum() + 8 * U * rloss.abs()
    _check("loss", loss.cpu(), rloss, b_loss)
    _check("dhidden", hx.grad.cpu(), hd.grad, b_dh)
    _check("dweight", wx.grad.cpu(), wd.grad, b_dw)
    _check("dbias", bx.grad.cpu(), bd.grad, b_db)
    ent_mean = (rent.detach() * mask).sum() / mask.sum()
    assert math.isclose(metrics["entropy"].item(), ent_mean.item(),
                        abs_tol=float((b_ent.detach().reshape(B, T) * mask).sum() / mask.sum()))


def test_defaults_are_the_plain_pass(device):
    """logit_scale=1 and softcap=None give bitwise the results without the options."""
    h, w, b, tg, mask = _inputs(torch.float32)
    targets = torch.where(mask, tg, -100)
    for backend in ("torch", "reference"):
        a = linear_logprobs(h, w, targets, bias=b, temperature=0.7, backend=backend,
                            return_entropy=True)
        c = linear_logprobs(h, w, targets, bias=b, temperature=0.7, backend=backend,
                            return_entropy=True, logit_scale=1.0, softcap=None)
        assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_module_takes_the_options(device):
    h, w, b, tg, mask = _inputs(torch.float32)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.7, logit_scale=3.0, softcap=2.0, backend="torch")
    a, _ = fused_policy_loss(h, w, tg, adv, None, mask, loss="grpo", bias=b, **kw)
    m, _ = FusedPolicyLoss("grpo", **kw)(h, w, tg, adv, None, mask, bias=b)
    assert torch.equal(a, m)


@pytest.mark.parametrize("name,value,exc", [
    ("softcap", 0.0, ValueError), ("softcap", -1.0, ValueError), ("softcap", float("inf"), ValueError),
    ("softcap", float("nan"), ValueError), ("softcap", "30", TypeError), ("softcap", True, TypeError),
    ("logit_scale", 0.0, ValueError), ("logit_scale", -2.0, ValueError),
    ("logit_scale", float("inf"), ValueError), ("logit_scale", None, TypeError),
    ("logit_scale", "1", TypeError),
])
def test_bad_options(device, name, value, exc):
    h, w, b, tg, mask = _inputs(torch.float32)
    adv = torch.zeros(B)
    targets = torch.where(mask, tg, -100)
    with pytest.raises(exc, match=name):
        linear_logprobs(h, w, targets, backend="torch", **{name: value})
    with pytest.raises(exc, match=name):
        fused_policy_loss(h, w, tg, adv, None, mask, backend="torch", **{name: value})
    with pytest.raises(exc, match=name):
        FusedPolicyLoss("grpo", **{name: value})


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_trainer_policy_applies_the_models_transform(impl):
    """opo_train's Policy on a model whose forward soft-caps its logits (a tiny Gemma-2 built from
    its config): log-probs and entropies are those of the model's own logits / temperature."""
    transformers = pytest.importorskip("transformers")
    from opo_train.model import Policy
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=16, final_logit_softcapping=0.5, pad_token_id=0,
                                    eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)  # logits of order 1: the cap saturates for some
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    with torch.no_grad():
        lsm = torch.log_softmax(hf.double()(input_ids=ids, attention_mask=att).logits / 0.7, -1)
        hf.float()
    targets = torch.roll(ids, -1, -1)
    rlp = lsm.gather(-1, targets[..., None]).squeeze(-1)
    rent = -(lsm.exp() * lsm).sum(-1)
    batch = {"input_ids": ids, "attention_mask": att, "targets": targets,
             "mask": torch.ones_like(ids, dtype=torch.bool)}
    with torch.no_grad():
        lp, ent = Policy(hf)(batch, mode="logprobs", impl=impl, backend="torch", temperature=0.7)
    # fp32 model against float64, |logits| < 0.5 / 0.7: a few hundred ulps of the backbone
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=0, atol=1e-5)
