"""The per-token gradient coefficients of the one-pass path in closed form
(:meth:`opo_kernels.losses.LossPlan.chunk_grads`): d(loss)/d logp and d(loss)/d entropy of every
loss type × RL term the loss tests cover, chunk by chunk (chunks of whole sequences, and pieces
of a sequence longer than the chunk where the loss allows), against float64 autograd of the loss
formula on the whole batch; the one-pass path runs no autograd and no host synchronization.

Bounds. ``u`` is the unit roundoff of the dtype the closed form runs in (2^-24 fp32, 2^-53
float64); the reference is float64 autograd of the same inputs. A coefficient is a product of at
most 16 rounded operations (ratio, clamp, sigmoid or exp, weights, divisors), one of which may
be an exp whose rounded argument x adds |x|·u, after a sum over the ≤ T tokens of its sequence
(≤ T·u of the summed magnitudes); the terms it cancels (−ω + μv, 1 − e^x + kl) are no larger
than the batch's largest coefficient S. So |g − g64| ≤ (16 + T + max|x|)·u·(|g64| + S). The
float64 closed form against float64 autograd checks the algebra (both at 2^-53); the fp32 one
checks that nothing in it loses more than fp32 rounding.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from test_edges import _stale_batch
from test_rl_terms import CASES as TERM_CASES
from test_rl_terms import rl_tensors
from test_losses import BASELINE_CASES, OPO_CASES
from opo_kernels import chunked, fused_policy_loss
from opo_kernels.checks import check_options
from opo_kernels.options import LossOptions
from opo_kernels.losses import RLInputs, LossPlan, make_plan, plan_full_batch

# every loss type and option set of the loss tests, plus the options only the RL-term and TRL
# tests reach (dual clip, TRL's two-sided clip, sequence-level ratio, off-policy masking)
LOSS_CASES = {**{f"opo_{k}": {"loss": "opo", **v} for k, v in OPO_CASES.items()},
              **BASELINE_CASES,
              "bnpo": {"loss": "bnpo"}, "cispo": {"loss": "cispo"}, "sapo": {"loss": "sapo"},
              "luspo": {"loss": "luspo"}, "vespo": {"loss": "vespo"},
              "dual_clip": {"loss": "grpo", "clip_ratio_c": 1.5},
              "clip_delta": {"loss": "grpo", "clip_delta": 1.1},
              "grpo_seq_ratio": {"loss": "grpo", "ratio_level": "sequence"},
              "cispo_seq_ratio": {"loss": "cispo", "ratio_level": "sequence"},
              "off_policy_mask": {"loss": "grpo", "off_policy_mask_threshold": 0.05},
              "opo_off_policy_mask": {"loss": "opo", "off_policy_mask_threshold": 0.05}}
TERMS = {"plain": {}, **TERM_CASES}


def _combos():
    out = []
    for ln, lo in LOSS_CASES.items():
        for tn, to in TERMS.items():
            opts = {**lo, **to}
            if opts.get("loss") == "dr_grpo" and "max_completion_length" not in opts:
                opts["max_completion_length"] = 7
            try:  # group_softmax reads no RL term: those combinations are refused by the API
                check_options(LossOptions(**opts))
            except ValueError:
                continue
            out.append(pytest.param(opts, id=f"{ln}-{tn}"))
    return out


COMBOS = _combos()


def _inputs(bt, opts, on_policy=False):
    """Plan and per-token tensors as the public path builds them: masked anchors 0, the
    masked positions' log-probs and entropies arbitrary (the vocabulary pass's output)."""
    N = bt.valid.numel()
    m = bt.valid.float()
    lp64, ent64 = ref.logprobs(bt.hidden.reshape(N, -1).double(), bt.weight.double(),
                               torch.where(m > 0, bt.targets.reshape(-1), 0), bt.bias.double())
    lp = torch.where(m > 0, lp64.float(), -7.5)
    ent = torch.where(m > 0, ent64.float(), 3.25)
    old = None if on_policy else torch.where(m > 0, bt.old_logps.reshape(-1), 0.0)
    refl, roll = (torch.where(m > 0, t.reshape(-1), 0.0) for t in rl_tensors(bt))
    lengths = torch.tensor(bt.lengths)
    ex = RLInputs(ref=refl if opts.get("beta", 0) > 0 else None,
                rollout=roll if opts.get("is_correction") or opts.get("off_policy_mask_threshold")
                else None)
    o = LossOptions(**opts)
    plan = make_plan(o, bt.advantages, m, lengths, old, bt.V, None, ex)
    plan_full_batch(plan, lp, m, None, ent)
    seq = torch.repeat_interleave(torch.arange(len(bt.lengths)), lengths)
    return plan, lp, old, m, seq, ent


def _autograd64(plan: LossPlan, lp, old, m, seq, ent):
    """float64 autograd of the loss formula on the whole batch: (d/d logp, d/d entropy)."""
    x = lp.double().requires_grad_(True)
    e = ent.double().requires_grad_(True)
    loss, _ = plan.chunk_loss(x, None if old is None else old.double(), m.double(), seq, 0,
                              len(plan.lengths), 0, e)
    gx, ge = torch.autograd.grad(loss, [x, e], allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), (torch.zeros_like(e) if ge is None else ge)


def _closed_form(plan: LossPlan, lp, old, m, seq, ent, chunk, dtype):
    """chunk_grads over the one-pass path's chunks: chunks of whole sequences; a sequence longer
    than the chunk as pieces where the loss is :attr:`piece_separable`, else whole."""
    lp, ent = lp.to(dtype), ent.to(dtype)
    old = None if old is None else old.to(dtype)
    m = m.to(dtype)
    gl, ge = torch.zeros_like(lp), torch.zeros_like(ent)
    spans = [(0, len(lp), 0, len(plan.lengths))] if plan.needs_full_batch else \
        chunked.plan_chunks(plan.lengths.tolist(), chunk)
    for t0, t1, s0, s1 in spans:
        subs = chunked.sub_chunks(t0, t1, chunk)
        if len(subs) > 1 and plan.piece_separable and not plan.needs_full_batch:
            pieces = []
            for a, b in subs:
                ln = torch.zeros(s1 - s0, dtype=torch.int64)
                ln[-1] = b - a
                pieces.append((a, b, ln))
        else:
            pieces = [(t0, t1, None)]
        for a, b, ln in pieces:
            _, _, g, e = plan.chunk_grads(lp[a:b], None if old is None else old[a:b], m[a:b],
                                          seq[a:b], s0, s1, a, ent[a:b], ln)
            assert not g.requires_grad and g.dtype == dtype
            gl[a:b] = g
            if e is not None:
                ge[a:b] = e
            else:
                assert plan.opts.entropy_coef == 0
    return gl, ge


def _check(got, want, u, T, xmax, what):
    assert not bool(torch.isnan(got).any()), f"{what}: NaN"
    S = want.abs().max().item()
    bound = (16 + T + xmax) * u * (want.abs() + S)
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), \
        f"{what}: max |err| {err.max().item():.3g} > bound {bound[err.argmax()].item():.3g} (S {S:.3g})"


def _compare(bt, opts, chunk, on_policy=False):
    plan, lp, old, m, seq, ent = _inputs(bt, opts, on_policy)
    want_l, want_e = _autograd64(plan, lp, old, m, seq, ent)
    T = max(bt.lengths)
    anchor = lp if old is None else old
    xmax = float(((lp - anchor) * m).abs().max())
    for dtype, u in ((torch.float64, 2.0 ** -53), (torch.float32, 2.0 ** -24)):
        gl, ge = _closed_form(plan, lp, old, m, seq, ent, chunk, dtype)
        _check(gl, want_l, u, T, min(xmax, 100.0), f"{dtype} d/dlogp")
        _check(ge, want_e, u, T, 0.0, f"{dtype} d/dentropy")
        # masked positions take part in nothing
        assert bool((gl[m == 0] == 0).all()) and bool((ge[m == 0] == 0).all())


@pytest.mark.parametrize("chunk", [3, 16])
@pytest.mark.parametrize("opts", COMBOS)
def test_closed_form_equals_float64_autograd(opts, chunk):
    """(B, T) = (6, 7) with a fully masked row; chunk 3 cuts every sequence, 16 holds two."""
    _compare(ref.make_batch("bt", B=6, T=7, V=97), opts, chunk)


@pytest.mark.parametrize("opts", [c for c in COMBOS if c.id.split("-")[1] in ("plain", "all", "is_seq_mask")])
def test_closed_form_packed(opts):
    """Packed lengths [3, 0, 7, 12, 1, 5], chunks of 5: an empty sequence, sequences in pieces."""
    _compare(ref.make_batch("cu", V=97), opts, 5)


@pytest.mark.parametrize("opts", [c for c in COMBOS if c.id.split("-")[1] in ("plain", "kl", "entropy")])
def test_closed_form_on_policy(opts):
    """No anchor: Δ = 0 exactly (every ratio 1, nothing clipped)."""
    _compare(ref.make_batch("bt", B=6, T=7, V=97), opts, 16, on_policy=True)


STALE = {"grpo": {"loss": "grpo"}, "dapo": {"loss": "dapo"}, "cispo": {"loss": "cispo"},
         "sapo": {"loss": "sapo"}, "gspo": {"loss": "gspo"}, "dual_clip": {"loss": "grpo", "clip_ratio_c": 1.5},
         "opo": {"loss": "opo"}, "opo_token": {"loss": "opo", "level": "token"},
         "grpo_seq_ratio": {"loss": "grpo", "ratio_level": "sequence"}}


@pytest.mark.parametrize("whole_seq", [False, True])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
@pytest.mark.parametrize("name", list(STALE))
def test_closed_form_ratio_past_exp_range(name, adv_sign, whole_seq):
    """A log-ratio of ~+90 (one token, or a whole sequence at +120): e^lr overflows fp32. A
    coefficient whose term is constant there (clipped, saturated) is exactly 0 and one on
    log-ratios is finite: both equal float64's; where −A·e^lr itself overflows (A < 0, unclipped)
    it is ∞ of the formula's sign, as fp32 autograd of the formula gives it. Never NaN; masked
    tokens 0."""
    bt = _stale_batch(whole_seq=whole_seq, shift=-120.0 if whole_seq else -90.0, adv_sign=adv_sign)
    opts = STALE[name]
    plan, lp, old, m, seq, ent = _inputs(bt, opts)
    gl, _ = _closed_form(plan, lp, old, m, seq, ent, 8, torch.float32)
    assert not bool(torch.isnan(gl).any())
    assert bool((gl[m == 0] == 0).all())
    want, _ = _autograd64(plan, lp, old, m, seq, ent)
    x = lp.detach().requires_grad_(True)
    loss, _ = plan.chunk_loss(x, old, m, seq, 0, len(bt.lengths), 0, ent)
    (g32,) = torch.autograd.grad(loss, [x])
    over = torch.isinf(gl)
    assert bool((gl[over] == g32[over]).all())
    assert adv_sign < 0 or not bool(over.any()), "A > 0: the overflowing token is clipped"
    # the log-ratio itself (~90-120) is the argument of the ratio's exp
    _check(gl[~over], want[~over], 2.0 ** -24, max(bt.lengths), 120.0, "finite coefficients")


# ------------------------------------------------------------------------------------------------
# The one-pass path: no autograd, no host synchronization per chunk
# ------------------------------------------------------------------------------------------------

HOT = [{"loss": "opo"}, {"loss": "opo", "level": "token", "beta": 0.1, "entropy_coef": 0.02},
       {"loss": "gspo", "is_correction": "sequence_mask"}, {"loss": "grpo", "beta": 0.1},
       {"loss": "cispo", "is_correction": "token_truncate", "entropy_coef": 0.02},
       {"loss": "vespo"}, {"loss": "luspo", "off_policy_mask_threshold": 0.1}]


def _one_pass_call(opts, chunk):
    bt = ref.make_batch("cu", V=97)
    refl, roll = rl_tensors(bt)
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    kw = dict(opts)
    if kw.get("beta", 0) > 0:
        kw["ref_logps"] = refl
    if kw.get("is_correction") or kw.get("off_policy_mask_threshold"):
        kw["rollout_logps"] = roll
    loss, _ = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                bias=bt.bias, backend="torch", chunk_size=chunk, **bt.layout_kw, **kw)
    loss.backward()
    return h.grad, w.grad


@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("opts", HOT, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_one_pass_runs_no_autograd_and_no_sync(opts, chunk, monkeypatch):
    """The one-pass loss (chunks of whole sequences, pieces, a sequence's deferred scale, its
    two phases) with torch.autograd.grad raising, and .item() / .tolist() / bool() / float() /
    int() of a tensor raising inside the backend's pass; the gradients are unchanged."""
    want = _one_pass_call(opts, chunk)

    def no_grad_call(*a, **k):
        raise AssertionError("torch.autograd.grad called in the one-pass path")

    inside = [False]

    def sync(name, orig):
        def f(self, *a, **k):
            if inside[0]:
                raise AssertionError(f"host synchronization ({name}) in the one-pass path")
            return orig(self, *a, **k)
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.autograd, "grad", no_grad_call)
    orig_pass = chunked.one_pass_loss

    def one_pass(*a, **k):
        inside[0] = True
        try:
            return orig_pass(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(chunked, "one_pass_loss", one_pass)
    got = _one_pass_call(opts, chunk)
    for g, w_ in zip(got, want):
        assert torch.equal(g, w_)
