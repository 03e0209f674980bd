"""The edges where a silent wrong number could hide: log-ratios past fp32's exp range, anchors
that carry autograd history, second-order autograd, log-probs with the wrong sign, options a loss
would ignore, and the native vocabulary pass on tiny entropies, V = 1 and low temperatures.
Every value is compared with the float64 reference of ``tests/reference.py`` or the torch backend.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from test_rl_terms import ALL_LOSSES, close, loss_opts
from opo_kernels import fused_policy_loss, linear_logprobs, policy_loss

CPU_BACKENDS = ref.backends("torch", "native", "reference")


def _stale_batch(dtype=torch.float32, *, shift=-90.0, adv_sign=1.0, whole_seq=False):
    """A (4, 5) batch whose sequence 0 has a token (or every token) with ``logp − old`` beyond
    fp32's exp range (exp(x) overflows for x > 88.72): its anchor is shifted by ``shift``."""
    bt = ref.make_batch("bt", dtype, B=4, T=5, H=16, V=67, empty_row=False, seed=3)
    old = bt.old_logps.clone()
    valid = bt.valid.reshape(old.shape) > 0
    cols = valid[0].nonzero().squeeze(-1)
    assert cols.numel() >= 2
    if whole_seq:
        old[0, valid[0]] += shift
    else:
        old[0, cols[0]] += shift
    bt.old_logps = old
    bt.advantages = bt.advantages.clone()
    bt.advantages[0] = adv_sign * abs(float(bt.advantages[0])) + 0.1 * adv_sign
    return bt


def _run(bt, backend, opts):
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    b = bt.bias.clone().requires_grad_(True)
    extra = {} if backend in ("reference", "fused") else {"chunk_size": 8}
    loss, m = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=b,
                                backend=backend, **bt.layout_kw, **extra, **opts)
    loss.backward()
    return loss, m, (h.grad, w.grad, b.grad)


def _check_vs_reference(bt, backend, opts, tol=None):
    loss, _, grads = _run(bt, backend, opts)
    assert torch.isfinite(loss), (backend, opts, loss)
    for g in grads:
        assert bool(torch.isfinite(g).all()), (backend, opts)
    want = ref.reference_loss(bt, opts)
    kw = tol or {}
    close(loss, want["loss"], "loss", floor=1e-2, **kw)
    for got, exp, n in zip(grads, want["grads"], ("dh", "dw", "db")):
        close(got, exp, n, **kw)


# Every loss whose float64 value and gradient are finite and in fp32's range with one token's
# log-ratio at ~+90: the clipped family with A > 0 (the token is clipped: gradient exactly 0),
# cispo and sapo with either sign, OPO on log-ratios.
STALE_LOSSES = ALL_LOSSES + ["dual_clip"]


def _opts(name):
    return {"loss": "grpo", "clip_ratio_c": 1.5} if name == "dual_clip" else loss_opts(name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lossname", STALE_LOSSES)
def test_ratio_past_exp_range_positive_advantage(backend, lossname):
    _check_vs_reference(_stale_batch(), backend, _opts(lossname))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lossname", ["cispo", "sapo", "dual_clip", "opo", "opo_token"])
def test_ratio_past_exp_range_negative_advantage(backend, lossname):
    """A < 0: cispo's weight is capped, sapo's sigmoid saturates, dual clip bounds the term."""
    _check_vs_reference(_stale_batch(adv_sign=-1.0), backend, _opts(lossname))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lossname", ["gspo", "grpo", "cispo", "sapo"])
def test_sequence_ratio_past_exp_range(backend, lossname):
    """Every token of sequence 0 shifted: GSPO's sequence mean itself is past the exp range."""
    _check_vs_reference(_stale_batch(whole_seq=True, shift=-120.0), backend, _opts(lossname))


@pytest.mark.parametrize("backend", ["triton", "fused"])
@pytest.mark.parametrize("lossname", ["grpo", "cispo", "gspo", "sapo"])
def test_ratio_past_exp_range_triton(backend, lossname):
    _check_vs_reference(_stale_batch(whole_seq=lossname == "gspo", shift=-120.0), backend,
                        _opts(lossname))


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("lossname", ["grpo", "dapo", "cispo", "sapo", "gspo"])
def test_ratio_past_exp_range_bf16(backend, lossname):
    """bf16 head: the same finite gradient (the reference runs on the rounded inputs)."""
    bt = _stale_batch(torch.bfloat16, whole_seq=lossname == "gspo", shift=-120.0)
    _check_vs_reference(bt, backend, _opts(lossname), tol=dict(rtol=2e-2, atol_rel=1e-2))


@pytest.mark.parametrize("lossname", STALE_LOSSES)
def test_policy_loss_ratio_past_exp_range(lossname):
    """The same on log-probs (policy_loss): the gradient w.r.t. logps equals float64's."""
    bt = _stale_batch()
    opts = _opts(lossname)
    if opts["loss"] == "dr_grpo":
        opts = {**opts, "max_completion_length": 5}
    lp64, _ = ref.logprobs(bt.hidden.reshape(-1, bt.H), bt.weight, bt.targets.reshape(-1), bt.bias)
    lp = lp64.float().reshape(bt.targets.shape).requires_grad_(True)
    m = bt.valid.reshape(bt.targets.shape) > 0
    loss, _ = policy_loss(lp, bt.old_logps, bt.advantages, m, **opts)
    loss.backward()
    x = lp.detach().double().reshape(-1).requires_grad_(True)
    want, _ = ref.policy_loss(x, bt.old_logps.reshape(-1).double(), bt.advantages, bt.valid,
                              bt.lengths, **opts)
    want.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(lp.grad).all()), lossname
    close(loss, want, "loss", floor=1e-2)
    close(lp.grad.reshape(-1), x.grad, "dloss/dlogp")


# ------------------------------------------------------------------------------------------------
# Anchors with autograd history are constants of the loss, on every backend and in policy_loss
# ------------------------------------------------------------------------------------------------

def _anchor_grads(bt, backend, opts, with_history):
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    # an anchor computed with grad enabled from the same leaves (a trainer that forgot no_grad)
    lp = linear_logprobs(h, w, bt.targets, bias=bt.bias, backend="torch")
    lp = torch.where(bt.valid.reshape(lp.shape) > 0, lp, 0.0)
    anchors = {"old_logps": lp + 0.1, "ref_logps": lp - 0.2, "rollout_logps": lp + 0.05}
    if not with_history:
        anchors = {k: v.detach() for k, v in anchors.items()}
    extra = {} if backend in ("reference", "fused") else {"chunk_size": 8}
    loss, _ = fused_policy_loss(h, w, bt.targets, bt.advantages, anchors["old_logps"], bt.mask,
                                bias=bt.bias, backend=backend, ref_logps=anchors["ref_logps"],
                                rollout_logps=anchors["rollout_logps"], **extra, **opts)
    return torch.autograd.grad(loss, [h, w])


ANCHOR_CASES = {
    "opo": {"loss": "opo", "beta": 0.1, "is_correction": "token_truncate"},
    "group_softmax": {"loss": "opo", "escort": "group_softmax", "group_size": 2},
    "top_entropy": {"loss": "dapo", "top_entropy_quantile": 0.5, "beta": 0.1},
    "grpo": {"loss": "grpo", "beta": 0.1, "is_correction": "sequence_mask", "is_clip_min": 0.5},
}


@pytest.mark.parametrize("backend", ref.backends("torch", "native", "reference", "fused"))
@pytest.mark.parametrize("case", list(ANCHOR_CASES))
def test_anchor_with_history_is_a_constant(backend, case):
    """One-pass and two-phase paths alike: the gradient is that of the detached anchors."""
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2, junk_masked=False)
    got = _anchor_grads(bt, backend, ANCHOR_CASES[case], True)
    want = _anchor_grads(bt, backend, ANCHOR_CASES[case], False)
    for g, w_, n in zip(got, want, ("dh", "dw")):
        assert torch.equal(g, w_), (n, (g - w_).abs().max().item())


def test_policy_loss_anchor_with_history_is_a_constant():
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    lp64, _ = ref.logprobs(bt.hidden.reshape(-1, bt.H), bt.weight, bt.targets.reshape(-1), bt.bias)
    m = bt.valid.reshape(bt.targets.shape) > 0

    def grad(with_history):
        lp = lp64.float().reshape(m.shape).requires_grad_(True)
        a = lp if with_history else lp.detach()
        loss, _ = policy_loss(lp, a + 0.1, bt.advantages, m, loss="opo", ref_logps=a - 0.2,
                              rollout_logps=a + 0.05, beta=0.1, is_correction="token_truncate")
        return torch.autograd.grad(loss, lp)[0]

    assert torch.equal(grad(True), grad(False))


# ------------------------------------------------------------------------------------------------
# Second order: refused with a clear error, never a silent zero Hessian
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ref.backends("torch", "native", "reference"))
@pytest.mark.parametrize("lossname", ["opo", "grpo", "gspo_two_phase"])
def test_double_backward_refused(backend, lossname):
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    opts = {"loss": "gspo", "top_entropy_quantile": 0.5} if lossname == "gspo_two_phase" else \
        {"loss": lossname}
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    loss, _ = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                bias=bt.bias, backend=backend, **opts)
    (gh,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad((gh * gh).sum(), [h, w])
    # inside a larger objective (a gradient penalty): still refused, not a partial Hessian
    total = loss + (h * h).sum()
    (gh,) = torch.autograd.grad(total, h, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(gh.sum(), h)


@pytest.mark.parametrize("backend", ref.backends("torch", "reference"))
def test_create_graph_first_order_unchanged(backend):
    """create_graph=True alone (no second backward) gives the ordinary gradient."""
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    h = bt.hidden.clone().requires_grad_(True)
    out = []
    for cg in (False, True):
        loss, _ = fused_policy_loss(h, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                    bias=bt.bias, backend=backend)
        out.append(torch.autograd.grad(loss, h, create_graph=cg)[0].detach())
    assert torch.equal(out[0], out[1])


def test_double_backward_linear_logprobs_refused():
    bt = ref.make_batch("bt", B=2, T=3, H=8, V=17, empty_row=False, junk_masked=False)
    h = bt.hidden.clone().requires_grad_(True)
    lp = linear_logprobs(h, bt.weight, bt.targets.clamp_min(0), backend="torch")
    (gh,) = torch.autograd.grad(lp.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(gh.pow(2).sum(), h)


def test_double_backward_policy_loss_is_right():
    """policy_loss is plain autograd: its second order is float64's."""
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    lp64, _ = ref.logprobs(bt.hidden.reshape(-1, bt.H), bt.weight, bt.targets.reshape(-1), bt.bias)
    m = bt.valid.reshape(bt.targets.shape) > 0
    lp = lp64.float().reshape(m.shape).requires_grad_(True)
    loss, _ = policy_loss(lp, bt.old_logps, bt.advantages, m, loss="opo", level="token",
                          ratio="exact")
    (g,) = torch.autograd.grad(loss, lp, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), lp)
    x = lp.detach().double().reshape(-1).requires_grad_(True)
    want, _ = ref.policy_loss(x, bt.old_logps.reshape(-1).double(), bt.advantages, bt.valid,
                              bt.lengths, loss="opo", level="token", ratio="exact")
    (gx,) = torch.autograd.grad(want, x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx * gx).sum(), x)
    assert float(ggx.abs().max()) > 0
    close(gg.reshape(-1), ggx, "d(|dL/dlogp|^2)/dlogp", rtol=1e-4, atol_rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Log-probs must be <= 0 (up to rounding): a wrong-sign NLL is refused, naming the argument
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["old_logps", "ref_logps", "rollout_logps"])
@pytest.mark.parametrize("api", ["fused", "policy_loss"])
def test_positive_logps_refused(name, api):
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    m = bt.valid.reshape(bt.targets.shape) > 0
    nll = -bt.old_logps  # an NLL passed with the wrong sign
    kw = {"ref_logps": bt.old_logps, "rollout_logps": bt.old_logps, "beta": 0.1}
    old = nll if name == "old_logps" else bt.old_logps
    if name != "old_logps":
        kw[name] = nll
    with pytest.raises(ValueError, match=name):
        if api == "fused":
            fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, old, bt.mask,
                              bias=bt.bias, backend="torch", **kw)
        else:
            policy_loss(bt.old_logps, old, bt.advantages, m, **kw)


def test_positive_policy_logps_refused():
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    m = bt.valid.reshape(bt.targets.shape) > 0
    with pytest.raises(ValueError, match="logps"):
        policy_loss(-bt.old_logps, bt.old_logps, bt.advantages, m)


def test_logps_rounding_above_zero_accepted_and_masked_positions_ignored():
    """A confident token's fp32 log-prob may round a hair above 0; masked positions may hold
    anything."""
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2)
    m = bt.valid.reshape(bt.targets.shape) > 0
    old = bt.old_logps.clone()
    old[m] = old[m].clamp(max=0.0)
    old[0, m[0].nonzero()[0, 0]] = 1e-6
    old[~m] = 50.0
    loss, _ = policy_loss(bt.old_logps.clamp(max=0.0), old, bt.advantages, m, ref_logps=old,
                          beta=0.1)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------
# Options a loss would ignore are refused
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,kw,name", [
    ("grpo", {"num_items_in_batch": 10}, "num_items_in_batch"),
    ("sapo", {"num_items_in_batch": 10}, "num_items_in_batch"),
    ("dapo", {"num_seqs_in_batch": 4}, "num_seqs_in_batch"),
    ("cispo", {"num_seqs_in_batch": 4}, "num_seqs_in_batch"),
    ("dr_grpo", {"max_completion_length": 2}, "max_completion_length"),
    ("opo", {"process_group": "world"}, "process_group"),
    ("grpo", {"process_group": 0}, "process_group"),
])
@pytest.mark.parametrize("api", ["fused", "policy_loss"])
def test_ignored_option_refused(loss, kw, name, api):
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2, use_mask=False)
    m = bt.valid.reshape(bt.targets.shape) > 0
    exc = TypeError if name == "process_group" else ValueError
    with pytest.raises(exc, match=name):
        if api == "fused":
            fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, m,
                              bias=bt.bias, backend="torch", loss=loss, **kw)
        else:
            policy_loss(bt.old_logps, bt.old_logps, bt.advantages, m, loss=loss, **kw)


@pytest.mark.parametrize("loss,kw", [
    ("grpo", {"num_seqs_in_batch": 8}),
    ("grpo", {"num_items_in_batch": 30, "entropy_coef": 0.01}),  # the entropy bonus' token mean
    ("dapo", {"num_items_in_batch": 30}),
    ("dr_grpo", {"num_seqs_in_batch": 8, "max_completion_length": 5}),
    ("opo", {"num_seqs_in_batch": 8}),
])
def test_counts_the_loss_reads_accepted(loss, kw):
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False, seed=2, use_mask=False)
    m = bt.valid.reshape(bt.targets.shape) > 0
    ent = torch.rand(m.shape) if "entropy_coef" in kw else None
    out, _ = policy_loss(bt.old_logps, bt.old_logps - 0.1, bt.advantages, m, loss=loss,
                         entropy=ent, **kw)
    assert torch.isfinite(out)


def test_escort_weights_process_group_checked():
    from opo_kernels import escort_weights
    with pytest.raises(TypeError, match="process_group"):
        escort_weights(torch.randn(4), process_group="world")


# ------------------------------------------------------------------------------------------------
# The native vocabulary pass agrees with the torch backend at the edges
# ------------------------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(not ref.native_available(), reason="native CPU op unavailable")


def _vocab(name):
    from opo_kernels import native, vocab_torch
    return native if name == "native" else vocab_torch


@needs_native
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_v1_logp_is_zero(temperature, dtype):
    """One token in the vocabulary: log-prob exactly 0 and entropy 0 (as the torch backend)."""
    z = (torch.randn(37, 1, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    t = torch.zeros(37, dtype=torch.long)
    lp, lse, ent = _vocab("native").vocab_forward(z, t, temperature)
    assert torch.equal(lp, torch.zeros(37)) and torch.equal(ent, torch.zeros(37))
    want = _vocab("torch").vocab_forward(z, t, temperature)
    assert torch.equal(lse, want[1])


def _one_hot_rows(V=96, n=16):
    """Rows whose non-target probabilities are fp32 denormals: e^(-2s), s = 44 .. 52."""
    s = torch.linspace(44.0, 52.0, n)
    z = torch.zeros(n, V)
    z[:, 0] = s
    z[:, 1:] = -s[:, None] + 0.1 * torch.arange(V - 1)
    return z


@needs_native
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_native_tiny_entropies(temperature):
    """Entropies below FLT_MIN-scale terms: not flushed to 0, equal to the torch backend's up to
    the rounding of its denormal terms (each e^(s − lse) < FLT_MIN carries an absolute error ≤
    2^-150, times |s − lse| ≤ 104)."""
    z = _one_hot_rows() * temperature
    t = torch.zeros(z.shape[0], dtype=torch.long)
    got = _vocab("native").vocab_forward(z, t, temperature)[2]
    want = _vocab("torch").vocab_forward(z, t, temperature)[2]
    assert bool((want > 0).all()) and bool((got > 0).all())
    bound = 1e-5 * want.abs() + z.shape[1] * 104 * 2.0 ** -150
    assert bool(((got - want).abs() <= bound).all()), (got - want).abs().max().item()
    # the order of the entropies (top_entropy_quantile's mask) is the torch backend's
    assert torch.equal(got.argsort(), want.argsort())


@needs_native
def test_native_top_entropy_quantile_on_tiny_entropies():
    """top_entropy_quantile picks the same tokens on both backends when entropies are tiny."""
    V, H, B, T = 96, 2, 4, 4
    n = B * T
    # every non-target logit 92 .. 104 below the target's: all entropies come from denormals
    s = torch.linspace(48.5, 52.0, n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    hidden = torch.stack([s, torch.ones(n)], 1).reshape(B, T, H)
    weight = torch.zeros(V, H)
    weight[0, 0] = 1.0
    weight[1:, 0] = -1.0
    weight[1:, 1] = 0.05 * torch.arange(V - 1)
    targets = torch.zeros(B, T, dtype=torch.long)
    targets[:, 1::2] = 3
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    out = {}
    for be in ("torch", "native"):
        h = hidden.clone().requires_grad_(True)
        loss, m = fused_policy_loss(h, weight, targets, adv, None, loss="dapo", backend=be,
                                    top_entropy_quantile=0.5)
        loss.backward()
        out[be] = (loss.detach(), h.grad, m["entropy_mask_frac"])
    assert float(out["torch"][2]) == 0.5 and float(out["native"][2]) == 0.5
    close(out["native"][0], out["torch"][0], "loss", floor=1e-2)
    close(out["native"][1], out["torch"][1], "dh")


def _dz64(z, t, T, g):
    zz = z.double().requires_grad_(True)
    lp = torch.log_softmax(zz / T, -1).gather(1, t[:, None]).squeeze(1)
    (lp * g.double()).sum().backward()
    return zz.grad


@needs_native
@pytest.mark.parametrize("temperature", [0.01, 1e-3, 1e-6])
def test_native_low_temperature_gradients(temperature):
    """At low temperature the gradient is dominated by the rounding of s = z / T; the native pass
    rounds s as the torch backend does, so its error against float64 stays at the torch
    backend's (its rounding floor, measured here on the same rows): at most twice it."""
    g = torch.Generator().manual_seed(4)
    n, V = 48, 300
    z = torch.randn(n, V, generator=g) * 3
    z[::2] *= temperature * 20  # half the rows unsaturated, half saturated
    t = torch.randint(0, V, (n,), generator=g)
    gl = torch.randn(n, generator=g)
    want = _dz64(z, t, temperature, gl)
    err = {}
    for name in ("torch", "native"):
        m = _vocab(name)
        _, lse, _ = m.vocab_forward(z, t, temperature)
        dz = m.vocab_backward(z.clone(), t, lse, None, gl, None, temperature).double()
        e = (dz - want).abs()
        err[name] = (e.max().item(), (e.sum() / want.abs().sum()).item())
    assert err["native"][0] <= 2 * err["torch"][0], err
    assert err["native"][1] <= 2 * err["torch"][1], err
