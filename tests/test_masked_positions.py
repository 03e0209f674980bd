"""Masked positions take part in nothing: not the loss, not a GEMM, not a metric, not a gradient.

A padded row of a real model can hold NaN (a fully masked attention row under SDPA). Positions
masked by ``mask`` or by ``targets == ignore_index`` are poisoned with NaN/inf hidden states here,
and every backend must give the float64 reference's numbers computed without them.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import fused_policy_loss, linear_logprobs

BACKENDS = ref.backends("torch", "reference", "triton", "fused", "native")



def _poisoned(via: str, seed=0):
    """A (B, T) batch whose invalid positions hold NaN / inf hidden states, and its clean twin."""
    bt = ref.make_batch("bt", B=4, T=6, H=16, V=50, seed=seed, use_mask=(via == "mask"),
                        junk_masked=(via == "mask"), empty_row=False)
    inval = (bt.valid == 0).reshape(4, 6)
    if via == "ignore_index":
        inval[:, -2:] = True
        bt.targets[:, -2:] = -100
        bt.valid = (bt.targets.reshape(-1) != -100).double()
    else:
        inval[:, -2:] = True
        bt.mask[:, -2:] = False
        bt.valid = (bt.mask.reshape(-1) & (bt.targets.reshape(-1) != -100)).double()
    clean = bt.hidden.clone()
    clean[inval] = 0.0
    bad = bt.hidden.clone()
    bad[inval] = float("nan")
    bad[0, -1, 3] = float("inf")  # position (0, T-1) is invalid in both variants
    return bt, clean, bad, inval


@pytest.mark.parametrize("loss", ["opo", "grpo", "gspo"])
@pytest.mark.parametrize("via", ["mask", "ignore_index"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_at_masked_positions_takes_no_part(backend, via, loss):
    bt, clean, bad, inval = _poisoned(via)
    bt.hidden = clean
    want = ref.reference_loss(bt, {"loss": loss})
    h = bad.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    b = bt.bias.clone().requires_grad_(True)
    out, metrics = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                     bias=b, loss=loss, backend=backend)
    out.backward()
    tag = f"{backend}/{via}/{loss}"
    assert torch.isfinite(out), f"{tag}: loss {out.item()}"
    assert abs(out.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6, tag
    for k, v in want["metrics"].items():
        assert torch.isfinite(metrics[k]), f"{tag}: metric {k} = {metrics[k]}"
        assert abs(float(metrics[k]) - v) <= 1e-4 * abs(v) + 1e-6, f"{tag}: metric {k}"
    gh, gw, gb = want["grads"]
    assert torch.equal(h.grad[inval], torch.zeros_like(h.grad[inval])), f"{tag}: dhidden at masked rows"
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-4, atol=1e-6, msg=f"{tag}: dhidden")
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-6, msg=f"{tag}: dweight")
    torch.testing.assert_close(b.grad.double(), gb, rtol=1e-4, atol=1e-6, msg=f"{tag}: dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_reads_ignore_index(backend):
    """Positions whose target equals ``ignore_index`` get log-prob 0, entropy 0 and no gradient,
    whatever ``ignore_index`` is (7 here: a real token id) and whatever their hidden state holds."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 12, 16, 40
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 5, 9]] = 7
    ign = targets == 7
    lp_ref, ent_ref = ref.logprobs(hidden.double(), weight, targets, ignore_index=7)
    bad = hidden.clone()
    bad[ign] = float("nan")
    h = bad.requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = linear_logprobs(h, w, targets, ignore_index=7, return_entropy=True, backend=backend)
    assert torch.equal(lp[ign], torch.zeros(3)), f"{backend}: log-prob at ignore_index {lp[ign]}"
    assert torch.equal(ent[ign], torch.zeros(3)), f"{backend}: entropy at ignore_index {ent[ign]}"
    torch.testing.assert_close(lp.double()[~ign], lp_ref[~ign], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double()[~ign], ent_ref[~ign], rtol=1e-5, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), backend
    assert torch.equal(h.grad[ign], torch.zeros_like(h.grad[ign]))
    hd = hidden.double().clone()
    hd[ign] = 0
    hd.requires_grad_(True)
    wd = weight.double().requires_grad_(True)
    lpd, entd = ref.logprobs(hd, wd, targets, ignore_index=7)
    ((lpd + entd) * (~ign)).sum().backward()
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-5)
