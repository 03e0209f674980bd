"""The RL terms (docs/contract.md, "RL terms") against the float64 reference of
``tests/reference.py``, on every backend (triton / fused under the interpreter at small shapes):
rollout-mismatch importance sampling, KL to a reference, the entropy bonus and its gradient,
top-entropy masking, the loss types bnpo / cispo / sapo, dual clip; fixed ω and global
normalizers (k micro-batches with gradient accumulation equal one call, every loss); bad input.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import escort_weights, fused_policy_loss, policy_loss
from opo_kernels.options import OPTION_NAMES, LossOptions, counts_read

TOL = dict(rtol=1e-5, atol_rel=1e-5)


def close(got, want, what, rtol=TOL["rtol"], atol_rel=TOL["atol_rel"], floor=1e-12):
    """Elementwise |got − want| ≤ rtol·|want| + atol_rel·max(max|want|, floor). ``floor``: the
    magnitude of the terms a scalar sums (a loss near 0 is a cancellation of O(floor) terms)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, what
    scale = max(w.abs().max().item() if w.numel() else 0.0, floor)
    err = (g - w).abs()
    bound = rtol * w.abs() + atol_rel * max(scale, 1e-12)
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3g} (scale {scale:.3g})"


def rl_tensors(bt, seed=5, noise=0.3, nan_masked=True):
    """ref_logps and rollout_logps near the batch's anchor, NaN at masked positions."""
    g = torch.Generator().manual_seed(seed)
    old = bt.old_logps.reshape(-1).double()
    refl = (old + noise * torch.randn(old.shape, generator=g, dtype=torch.float64)).float()
    roll = (old + noise * torch.randn(old.shape, generator=g, dtype=torch.float64)).float()
    if nan_masked:
        bad = bt.valid == 0
        refl[bad] = float("nan")
        roll[bad] = float("nan")
    shp = bt.targets.shape
    return refl.reshape(shp), roll.reshape(shp)


ALL_LOSSES = ["opo", "opo_token", "opo_sum", "grpo", "dapo", "bnpo", "gspo", "dr_grpo", "cispo", "sapo"]


def loss_opts(name):
    return {"opo": {"loss": "opo"}, "opo_token": {"loss": "opo", "level": "token"},
            "opo_sum": {"loss": "opo", "seq_reduce": "sum"}}.get(name, {"loss": name})


CASES = {
    "kl": dict(beta=0.1),
    "kl_bias": dict(beta=0.2, use_bias_correction_kl=True),
    "is_tok_trunc": dict(is_correction="token_truncate", is_clip_max=1.2),
    "is_tok_mask": dict(is_correction="token_mask", is_clip_max=1.3, is_clip_min=0.8),
    "is_seq_trunc": dict(is_correction="sequence_truncate", is_clip_max=1.5, is_clip_min=0.5),
    "is_seq_mask": dict(is_correction="sequence_mask", is_clip_max=2.0, is_clip_min=0.5),
    "entropy": dict(entropy_coef=0.05),
    "top_entropy": dict(top_entropy_quantile=0.4),
    "all": dict(beta=0.1, use_bias_correction_kl=True, is_correction="token_truncate",
                entropy_coef=0.03, top_entropy_quantile=0.6),
}
DUAL = {"loss": "grpo", "clip_ratio_c": 1.5}


def run_case(bt, backend, opts, chunk=None):
    refl, roll = rl_tensors(bt)
    kw = dict(opts)
    if kw.get("beta", 0) > 0 or "ref" in kw.pop("_feed", "ref,roll"):
        kw["ref_logps"] = refl
    kw["rollout_logps"] = roll
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    b = bt.bias.clone().requires_grad_(True)
    extra = {} if chunk is None or backend in ("reference", "fused") else {"chunk_size": chunk}
    loss, m = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=b,
                                backend=backend, **bt.layout_kw, **extra, **kw)
    loss.backward()
    want = ref.reference_loss(bt, kw)
    close(loss, want["loss"], "loss", floor=1e-2)
    for got, exp, n in zip((h.grad, w.grad, b.grad), want["grads"], ("dh", "dw", "db")):
        close(got, exp, n)
    for k, v in want["metrics"].items():
        if k in m and k != "tau_eff":
            close(m[k], torch.tensor(v), f"metric {k}", rtol=1e-4, atol_rel=1e-5, floor=1e-3)
    for k in ("kl", "mismatch_k1", "mismatch_k3"):
        assert k in m
    if "is_correction" in opts:
        for k in ("is_weight_mean", "is_weight_min", "is_weight_max", "is_frac_cut"):
            assert k in m and k in want["metrics"]
    return m


@pytest.mark.parametrize("backend", ref.backends("torch", "native", "reference"))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lossname", ALL_LOSSES)
def test_terms_vs_reference_cpu(backend, case, lossname):
    bt = ref.make_batch("bt", B=6, T=7, V=97)
    run_case(bt, backend, {**loss_opts(lossname), **CASES[case]}, chunk=8)


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", ["all", "is_seq_mask", "entropy"])
@pytest.mark.parametrize("lossname", ["opo", "grpo", "cispo"])
def test_terms_packed_subchunks(backend, case, lossname):
    """Packed inputs, sequences longer than the chunk (the sub-chunk path keeps each sub-chunk's
    entropies for the entropy gradient)."""
    bt = ref.make_batch("cu", V=97)
    run_case(bt, backend, {**loss_opts(lossname), **CASES[case]}, chunk=4)


@pytest.mark.parametrize("backend", ["triton", "fused"])
@pytest.mark.parametrize("case", ["all", "is_seq_trunc", "entropy"])
@pytest.mark.parametrize("lossname", ["opo", "dapo"])
def test_terms_vs_reference_triton(backend, case, lossname):
    bt = ref.make_batch("bt", B=4, T=5, H=16, V=67, empty_row=False)
    run_case(bt, backend, {**loss_opts(lossname), **CASES[case]}, chunk=8)


@pytest.mark.parametrize("backend", ref.backends("torch", "native", "reference"))
@pytest.mark.parametrize("loss", ["grpo", "dapo", "bnpo", "dr_grpo", "gspo"])
def test_dual_clip(backend, loss):
    bt = ref.make_batch("bt", B=6, T=7, V=97, old_noise=0.8)
    run_case(bt, backend, {"loss": loss, "clip_ratio_c": 1.5}, chunk=8)


def test_entropy_bonus_value():
    """loss(entropy_coef=c) = loss(0) − c · mean over valid tokens of H (TRL's definition)."""
    bt = ref.make_batch("bt", B=4, T=5, V=50)
    l0, m = fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                              bias=bt.bias, loss="dapo", backend="torch")
    l1, _ = fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                              bias=bt.bias, loss="dapo", backend="torch", entropy_coef=0.5)
    close(l1, l0 - 0.5 * m["entropy"], "bonus")


# ------------------------------------------------------------------------------------------------
# Fixed ω and global normalizers: k micro-batches with gradient accumulation equal one call
# ------------------------------------------------------------------------------------------------

def _slice(bt, s0, s1):
    T = bt.targets.shape[1]
    return dict(hidden=bt.hidden[s0:s1], targets=bt.targets[s0:s1], advantages=bt.advantages[s0:s1],
                old=bt.old_logps[s0:s1], mask=bt.mask[s0:s1])


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("lossname", ALL_LOSSES)
@pytest.mark.parametrize("terms", ["plain", "terms"])
def test_microbatches_equal_one_call(k, lossname, terms):
    bt = ref.make_batch("bt", B=8, T=6, V=61, seed=3)
    refl, roll = rl_tensors(bt)
    opts = loss_opts(lossname)
    if terms == "terms":
        opts.update(beta=0.1, use_bias_correction_kl=True, is_correction="sequence_truncate",
                    is_clip_max=1.4, entropy_coef=0.02)
    valid = bt.valid.reshape(bt.targets.shape)
    n_items = float(valid.sum())
    n_seqs = float((valid.sum(1) > 0).sum())
    if lossname == "dr_grpo":
        n_seqs = float(bt.targets.shape[0])  # dr_grpo divides by all sequences
        opts["max_completion_length"] = 6
    omega = None
    if lossname.startswith("opo"):
        omega = escort_weights(bt.advantages, valid=valid.sum(1) > 0)

    def call(s0, s1, glob):
        w = weight
        kw = dict(opts)
        if glob:
            reads = counts_read(LossOptions(**{k: v for k, v in kw.items() if k in OPTION_NAMES}))
            kw.update({k: v for k, v, r in (("num_items_in_batch", n_items, reads[0]),
                                            ("num_seqs_in_batch", n_seqs, reads[1])) if r})
            if omega is not None:
                kw["omega"] = omega[s0:s1]
        if terms == "terms":
            kw.update(ref_logps=refl[s0:s1], rollout_logps=roll[s0:s1])
        loss, _ = fused_policy_loss(hidden[s0:s1], w, bt.targets[s0:s1], bt.advantages[s0:s1],
                                    bt.old_logps[s0:s1], bt.mask[s0:s1], bias=bias, backend="torch", **kw)
        return loss

    hidden = bt.hidden.clone().requires_grad_(True)
    weight = bt.weight.clone().requires_grad_(True)
    bias = bt.bias.clone().requires_grad_(True)
    one = call(0, 8, False)
    one.backward()
    g1 = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    total = 0.0
    step = 8 // k
    for s0 in range(0, 8, step):
        part = call(s0, s0 + step, True)
        part.backward()
        total = total + part.detach()
    close(total, one, "loss", floor=1e-2)
    for got, want, n in zip((hidden.grad, weight.grad, bias.grad), g1, ("dh", "dw", "db")):
        close(got, want, n)


def test_omega_equals_computed():
    """omega = escort_weights(...) over the batch gives the loss computed without it."""
    bt = ref.make_batch("bt", B=6, T=5, V=40)
    valid = bt.valid.reshape(bt.targets.shape).sum(1) > 0
    om = escort_weights(bt.advantages, valid=valid)
    a, _ = fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                             bias=bt.bias, backend="torch")
    b, _ = fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                             bias=bt.bias, backend="torch", omega=om)
    close(b, a, "loss")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _call(**kw):
    bt = ref.make_batch("bt", B=4, T=5, V=40)
    refl, roll = rl_tensors(bt)
    base = dict(bias=bt.bias, backend="torch")
    for k, v in list(kw.items()):
        if isinstance(v, str) and v in ("REF", "ROLL"):
            kw[k] = refl if v == "REF" else roll
    base.update(kw)
    return fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                             **base), bt


BAD = [
    (dict(beta=0.1), "ref_logps"),
    (dict(is_correction="token_mask"), "rollout_logps"),
    (dict(entropy_coef=-0.1), "entropy_coef"),
    (dict(is_correction="token_mask", rollout_logps="ROLL", is_clip_min=2.0, is_clip_max=1.0), "is_clip_min"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(top_entropy_quantile=-0.1), "top_entropy_quantile"),
    (dict(is_correction="tokens", rollout_logps="ROLL"), "is_correction"),
    (dict(beta=-1.0, ref_logps="REF"), "beta"),
    (dict(loss="grpo", clip_ratio_c=0.9), "clip_ratio_c"),
    (dict(omega=torch.zeros(3)), "omega"),
    (dict(loss="grpo", omega=torch.zeros(4)), "omega"),
    (dict(omega=torch.zeros(4), alpha=0.7), "omega"),
    (dict(num_items_in_batch=-1), "num_items_in_batch"),
    (dict(num_seqs_in_batch=float("nan")), "num_seqs_in_batch"),
    (dict(ref_logps=torch.zeros(4, 4)), "ref_logps"),
    (dict(rollout_logps=torch.zeros(4, 6)), "rollout_logps"),
    (dict(loss="sapo", clip_eps_low=0.1), "clip_eps_low"),
    (dict(loss="cispo", clip_eps_low=0.1), "clip_eps_low"),
    (dict(loss="grpo", is_clip_max=2.0), "is_clip_max"),
    (dict(escort="group_softmax", group_size=2, beta=0.1, ref_logps="REF"), "beta"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_input(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _call(**kw)


@pytest.mark.parametrize("name", ["ref_logps", "rollout_logps"])
def test_nan_at_valid_position(name):
    bt = ref.make_batch("bt", B=4, T=5, V=40)
    refl, roll = rl_tensors(bt)
    t = (refl if name == "ref_logps" else roll).clone()
    pos = (bt.valid > 0).nonzero()[0, 0]
    t.view(-1)[pos] = float("nan")
    kw = {name: t, "beta" if name == "ref_logps" else "is_correction":
          0.1 if name == "ref_logps" else "token_truncate"}
    with pytest.raises(ValueError, match=name):
        fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                          bias=bt.bias, backend="torch", **kw)


def test_nan_at_masked_positions_takes_no_part():
    """NaN in ref/rollout log-probs at masked positions: finite loss and gradients."""
    bt = ref.make_batch("bt", B=4, T=5, V=40)
    refl, roll = rl_tensors(bt, nan_masked=True)
    h = bt.hidden.clone().requires_grad_(True)
    loss, m = fused_policy_loss(h, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                bias=bt.bias, backend="torch", beta=0.1, ref_logps=refl,
                                rollout_logps=roll, is_correction="token_mask")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_policy_loss_entropy_term():
    """policy_loss (per-token log-probs) with the entropy term: needs entropy, differentiates it."""
    bt = ref.make_batch("bt", B=4, T=5, V=40)
    lp, ent = ref.logprobs(bt.hidden.reshape(-1, bt.H), bt.weight, bt.targets.reshape(-1), bt.bias)
    lp = lp.float().reshape(4, 5).requires_grad_(True)
    ent = ent.float().reshape(4, 5).requires_grad_(True)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, bt.old_logps, bt.advantages, bt.mask, entropy_coef=0.1)
    loss, _ = policy_loss(lp, bt.old_logps, bt.advantages, bt.mask, entropy=ent, entropy_coef=0.1)
    loss.backward()
    m = bt.mask.float()
    close(ent.grad, -0.1 * m / m.sum(), "dloss/dH")


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("lossname", ["opo", "dapo", "gspo"])
def test_terms_bf16(backend, lossname):
    """bf16 inputs: the terms at the rounding floor (the reference runs on the rounded inputs)."""
    bt = ref.make_batch("bt", torch.bfloat16, B=6, T=7, V=97)
    refl, roll = rl_tensors(bt)
    kw = {**loss_opts(lossname), **CASES["all"], "ref_logps": refl, "rollout_logps": roll}
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    loss, _ = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=bt.bias,
                                backend=backend, chunk_size=8, **kw)
    loss.backward()
    want = ref.reference_loss(bt, kw)
    close(loss, want["loss"], "loss", rtol=2e-2, atol_rel=1e-2, floor=1e-2)
    close(h.grad, want["grads"][0], "dh", rtol=2e-2, atol_rel=1e-2)
    close(w.grad, want["grads"][1], "dw", rtol=2e-2, atol_rel=1e-2)
