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
